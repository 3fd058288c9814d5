#!/usr/bin/env bash
# One device call: the end-to-end table, the step profile (where the time goes), the GPU equivalence
# tests, then the per-op microbenchmarks, each under its own time limit, every result written under
# $OUT as soon as it exists.
# Usage (device tool, carry .whl): CHRONICALS_COMMIT=<sha> bash benchmarks/gpu_session.sh [e2e_s] [tests_s] [micro_s] [profile_s]
# (the device copy has no .git: pass the commit the tree was sent at)
# Defaults fill one 10-minute call only roughly; the kernel-only microbenchmarks need about 5 minutes
# on their own (see benchmarks/gpu_micro.py), so give them a call of their own when the budget allows.
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-benchmarks/results}"
S=/tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --target $S .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$S:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "(editable install failed: backend by name unavailable)"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
echo "== e2e"
COMMIT="${CHRONICALS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
timeout "${1:-240}" python3 benchmarks/e2e.py --shapes qwen0.5b-8x2048 --modes full --commit "$COMMIT" \
  --variants "${E2E_VARIANTS:-eager,inductor,chronicals}" --steps 10 --warmup 3 --out "$OUT" --name e2e 2>&1 | grep -v Warning
echo "== profile"
timeout "${4:-180}" python3 benchmarks/profile_step.py --commit "$COMMIT" --variants "${PROFILE_VARIANTS:-inductor,chronicals,chronicals-all}" \
  --out "$OUT" --name profile 2>&1 | grep -v Warning
echo "== gpu tests"
timeout "${2:-240}" python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
echo "== micro"
timeout "${3:-90}" python3 benchmarks/gpu_micro.py --ops ${MICRO_OPS:-rms_norm linear_cross_entropy swiglu rope} --out "$OUT" 2>&1 | grep -v Warning
