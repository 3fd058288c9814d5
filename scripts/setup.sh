#!/usr/bin/env bash
# Sourced by the README's two commands: makes .venv and installs the package with its test extras.
# torch comes first and pinned, so that no dependency resolves "torch" to a multi-GB CUDA build on a
# CPU machine; where torch is already importable (a GPU box), it is left alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# CHRONICALS_EXTRAS: the test command adds "quack" (CuTe-DSL lowers QuACK's kernels on a CPU too:
# tests/kernels/test_quack_kernels_compile.py)
python -m pip install -q -e ".[${CHRONICALS_EXTRAS:-test}]" "triton==3.6.0" "numpy<2.3"
