#!/usr/bin/env bash
# Packs QuACK (CuTe-DSL GEMMs with SwiGLU epilogues, benchmarks/bench_quack_mlp.py) for the GPU
# machine, which has no internet and takes at most 64 MiB of carried files: the wheels unpacked
# and recompressed as one tar.xz (about 56 MB) in .qk/ (git-ignored through .git/info/exclude).
# quack 0.3.0 is the first release with the gated kernels; it runs on nvidia-cutlass-dsl 4.4.1,
# as does flash-attn-4 4.0.0b4 (CuTe-DSL attention with a Hopper backward; later betas need newer
# QuACK and cutlass-dsl, whose APIs our GEMM calls predate),
# whose libs-base wheel is complete (the 4.8.1 wheels served here lack the DSL's Python package).
# Then, in the device call (carry ".qk"):
#   mkdir -p /tmp/qsite && tar -C /tmp/qsite -xJf .qk/quack.tar.xz &&
#   export PYTHONPATH=/tmp/qsite/nvidia_cutlass_dsl/python_packages:/tmp/qsite:$PWD
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.qk/' .git/info/exclude 2>/dev/null || echo '/.qk/' >> .git/info/exclude
tmp=$(mktemp -d)
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64"
for p in "quack-kernels==0.3.0" "flash-attn-4==4.0.0b4" "nvidia-cutlass-dsl==4.4.1" "nvidia-cutlass-dsl-libs-base==4.4.1" \
         "apache-tvm-ffi==0.1.15.post2" "torch-c-dlpack-ext==0.1.5" "einops==0.8.2"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d "$tmp/whl" "$p" 2>&1 | grep -v '^WARNING' || true
done
mkdir -p "$tmp/site" .qk
for w in "$tmp"/whl/*.whl; do python3 -m zipfile -e "$w" "$tmp/site"; done
tar -C "$tmp/site" -cf - . | xz -T0 -6 > .qk/quack.tar.xz
rm -rf "$tmp"
ls -la .qk/quack.tar.xz
