"""Fixtures of the CLI tests; plain helpers live in ``chronicals_compile.testing.cli_runner``."""
from __future__ import annotations

import pytest


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (code, stdout, stderr)`` through ``chronicals_compile.cli.main``."""
    from chronicals_compile.cli import main

    def run(*argv: str):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run
