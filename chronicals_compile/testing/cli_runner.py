"""Running the CLI as users do (a fresh ``python -m chronicals_compile`` process), for tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

#: The source checkout (tests and benchmarks run from it).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
