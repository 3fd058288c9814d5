"""Shared helpers for the CLI tests: run ``main`` in-process and capture its exit code and output."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (code, stdout, stderr)`` through ``chronicals_compile.cli.main``."""
    from chronicals_compile.cli import main

    def run(*argv: str):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_module(*argv: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m chronicals_compile ...`` in a fresh process (the real console path)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "chronicals_compile", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def error_lines(stderr: str) -> list[str]:
    """stderr without progress-bar noise."""
    return [line for line in stderr.splitlines() if line.strip()]
