#!/usr/bin/env bash
# Device calls for the GPU evidence, one stage or several per call, each stage under its own limit,
# every result written under $OUT as soon as it exists (at most 8 files come back from a call:
# e2e stages write md+json+2 png each, so run at most one e2e stage beside tests/profile).
# Usage (device tool, carry .whl): CHRONICALS_COMMIT=<sha> bash benchmarks/gpu_session.sh STAGE[=seconds] ...
# (the device copy has no .git: pass the commit the tree was sent at)
# Stages (default seconds):
#   tests=200       tests/gpu, one pytest process per file in parallel (one process took > 4 min);
#                   $GPU_TEST_FILES narrows the files
#   tests-bg=200    the same in the background (beside an e2e stage's untimed compiles); tests-wait
#                   waits for it and prints its summary
#   e2e=480         Qwen0.5B 8x2048 full FT: eager, inductor, liger, liger-compiled, cce, cce-exact, chronicals, chronicals-all, chronicals-lean
#                   ($E2E_VARIANTS overrides the list)
#   e2e-lora=540    the same shape with LoRA r=32: eager, inductor, liger, cce-exact, chronicals
#                   (LoRA compiles take about 80 s each on the H200 host)
#   e2e-long=540    Qwen0.5B 16x4096 full FT: eager and inductor (expected to run out of memory), liger, cce-exact, chronicals
#                   ($E2E_LONG_VARIANTS overrides the list)
#   e2e-llama=300   Llama-3.2-1B 8x2048 full FT
#   e2e-ours=300    Qwen0.5B 8x2048 full FT: inductor beside chronicals, chronicals-all, -lean, -tuned, -bigchunk, -lowmem
#   e2e-cce-lean=300  Qwen0.5B 8x2048 full FT: inductor, chronicals, chronicals-cce-lean (cce_mode="lean")
#   e2e-epilogue=380  Qwen0.5B 8x2048 full FT: inductor, chronicals (mlp_epilogue on QuACK: carry .qk),
#                   chronicals-no-epilogue ($E2E_EPILOGUE_VARIANTS overrides the list)
#   e2e-all-lean=240  the same with every kernel on, and with memory_budget 0.5
#   e2e-lora-bf16=480  LoRA r=32 with adapter weights in bf16 (peft's default is fp32): eager, inductor, liger, chronicals
#                   ($E2E_LORA_VARIANTS overrides the list)
#   lce-peers=300   cut cross-entropy against eager, compile, Liger, Apple CCE at the three issue shapes
#   lce-frozen=120  cut cross-entropy's gradient of h alone (frozen lm_head, LoRA) by method and layout
#   lce-chunks=150  cut cross-entropy chunk sizes (memory against speed), both logits modes
#   attention=90    grouped-query attention fwd+bwd: expanded k/v vs enable_gqa, per SDPA backend, and
#                   flash-attn-4's CuTe-DSL kernels (carried in .qk); errors against float32 math
#   cce-rows=60     the loss's row kernel alone, ours vs QuACK's, and the fused op with each (bench_cce_rows.py)
#   dgated-stages=150  QuACK's dgated GEMM by the depth of its epilogue's C prefetch (bench_quack_dgated_stages.py;
#                   $DGATED_ARGS passes e.g. --tiles pinned,pp128x192 --c-stages 3,4,5)
#   dgated-ncu=120  Nsight Compute's sections for one MLP backward GEMM as the step runs it (ncu_dgated.py):
#                   warp stall reasons, DRAM and tensor-core throughput (Firecracker machines read counters)
#   quack-launch=120  idle time before QuACK's GEMMs: after the interleave, back to back, after a small kernel,
#                   and the forward under other pinned configs (idle + kernel time)
#   e2e-gqa=200     Qwen0.5B 8x2048 full FT: inductor, chronicals, chronicals-gqa, chronicals-rope
#   e2e-levers=300  Qwen0.5B 8x2048 full FT: inductor, chronicals, chronicals-gqa, chronicals-cudagraphs (reduce-overhead)
#   e2e-pdl=330     Qwen0.5B 8x2048 full FT: inductor, chronicals, chronicals-pdl, inductor-pdl (Inductor's Programmatic
#                   Dependent Launch, ours and plain compile's); $E2E_PDL_VARIANTS overrides (e.g. add chronicals-nomix, inductor-nomix, chronicals-pdl-nomix,
#                   chronicals-combo, chronicals-keep-w1)
#   e2e-paired=420  Qwen0.5B 8x2048 full FT, every variant in one process, one step of each per round in a
#                   rotating order (e2e_paired.py): median paired ratios with distribution-free 95% intervals, for
#                   levers smaller than e2e's 0.6% run-to-run spread; $E2E_PAIRED_VARIANTS (default inductor,
#                   chronicals, chronicals-levers27, chronicals-pdl, chronicals-nomix, chronicals-keep-w1, inductor-pdl),
#                   $E2E_PAIRED_ROUNDS (default 30)
#   e2e-rope=300   Qwen0.5B 8x2048 full FT: inductor, chronicals, chronicals-rope (our RoPE op, off on CUDA), -cudagraphs, -rope-cudagraphs
#   concat-micro=60 linears on one input apart vs one GEMM (bench_concat_linear.py), fwd+bwd, no compile
#   mlp-epilogue=120  a Triton GEMM with the SwiGLU math in its epilogue vs cuBLAS + Inductor's kernel (bench_mlp_epilogue.py)
#   lora-micro=60   chronicals::lora_linear vs peft's three GEMMs + add (bench_lora_linear.py), fwd+bwd, no compile
#   e2e-concat=300  Qwen0.5B 8x2048 full FT: inductor, chronicals, chronicals-concat (concat_linear, off by default);
#                   for LoRA: E2E_LORA_VARIANTS=inductor,chronicals,chronicals-concat with e2e-lora-bf16
#   e2e-lora-levers=420  LoRA r=32 bf16 adapters: inductor, chronicals, -lora-linear, -concat, -lora-fused (both)
#   e2e-autotune=420  the same: inductor beside chronicals-autotune (max-autotune-no-cudagraphs; long compiles)
#   row-sweep=120   the fused mode's row kernel by launch shape, then the fused op by chunk rows
#   e2e-cce=300     Qwen0.5B 8x2048 full FT: inductor beside chronicals with each gradient chunk size, -lean, -tuned
#   micro-norm=200  kernel-only microbenchmarks of rms_norm and add_rms_norm
#   saved-lora=200  LoRA r=32 (bf16 adapters), 4 of Qwen0.5B's layers at 8x2048: what the forward holds for
#                   backward by shape, and the forward's and backward's peaks, with and without lora_linear
#   profile=120     profiler breakdown, inductor vs chronicals
#   forward-host=240  cProfile of the compiled training forward, inductor vs chronicals (bench_forward_host.py)
#   host-overhead=120  host time per call of a layer's ops, GPU busy (bench_host_overhead.py); cProfile of QuACK's call
#   profile-lora=180  the same for LoRA r=32 with bf16 adapters
#   micro-rope=90   kernel-only microbenchmark of rope (ours; session 28's and the 64-bit kernel; Liger, Inductor, eager)
#   preamble=150    host time from a step's call to its compiled forward, guards apart (step_preamble.py; host only)
#   micro=400       kernel-only microbenchmarks of rms_norm, add_rms_norm, swiglu, rope
#   lce=300         cut cross-entropy sweep (bench_linear_cross_entropy.py --sweep)
#   rms-sweep=240   RMSNorm backward launch shapes (programs per SM x rows per step) vs eager/Inductor
#   multi=300       tests/gpu_multi: finetune under torchrun on two GPUs (device kind nvidia-h200-x2 only)
#   dist=300        bench_distributed.py: Qwen0.5B 8x2048 single vs DDP vs FSDP2 on two GPUs (nvidia-h200-x2 only)
# Measured 2026-11-28 on one H200: tests 110 s in parallel; e2e 206 s; profile 100 s; micro 300 s.
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-benchmarks/results}"
S=/tmp/site
if [ -z "${CHRONICALS_SKIP_INSTALL:-}" ]; then  # gpu_lanes.sh installs once for all its lanes
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S .whl/*.whl 2>&1 | grep -v WARN | tail -2
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "(editable install failed: backend by name unavailable)"
fi
export PYTHONPATH=$S:$PWD
if [ -f .qk/quack.tar.xz ]; then  # QuACK for mlp_epilogue, carried as .qk (scripts/quack-wheels.sh)
  mkdir -p /tmp/qsite && tar -C /tmp/qsite -xJf .qk/quack.tar.xz
  export PYTHONPATH=/tmp/qsite/nvidia_cutlass_dsl/python_packages:/tmp/qsite:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
COMMIT="${CHRONICALS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
# --precompile: compiled variants are first compiled untimed, 3 at a time (about 50-60 s each on a
# cold host, one after another, in session 5); the timed runs then load them from the caches.
E2E="python3 benchmarks/e2e.py --commit $COMMIT --steps 10 --warmup 3 --out $OUT --precompile ${E2E_PRECOMPILE:-3}"

run_tests() {
  mkdir -p /tmp/gpu_logs
  for f in ${GPU_TEST_FILES:-tests/gpu/test_*.py}; do
    (timeout "$1" python3 -m pytest "$f" -q -p no:cacheprovider -p no:logging -o addopts="" -W ignore --durations=3 \
       > "/tmp/gpu_logs/$(basename "$f" .py).log" 2>&1; echo "rc=$?" >> "/tmp/gpu_logs/$(basename "$f" .py).log") &
  done
  wait
  for f in /tmp/gpu_logs/*.log; do echo "##### $f"; tail -25 "$f"; done > "$OUT/gpu_tests.log"
  grep -E "#####|passed|failed|rc=|^FAILED" "$OUT/gpu_tests.log"
}

stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(tests e2e profile)
for stage in "${stages[@]}"; do
  name="${stage%%=*}"; secs="${stage#*=}"; [ "$secs" = "$stage" ] && secs=""
  echo "== $name"
  case "$name" in
    tests) run_tests "${secs:-200}" ;;
    tests-bg) run_tests "${secs:-200}" > /tmp/gpu_tests_bg.out 2>&1 & TESTS_BG=$! ;;
    tests-wait) wait "${TESTS_BG:-}" 2>/dev/null; cat /tmp/gpu_tests_bg.out ;;
    e2e) timeout "${secs:-480}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e \
           --variants "${E2E_VARIANTS:-eager,inductor,liger,liger-compiled,cce,cce-exact,chronicals,chronicals-all,chronicals-lean}" 2>&1 | grep "^e2e:\|^|" ;;
    e2e-lora) timeout "${secs:-540}" $E2E --shapes qwen0.5b-8x2048 --modes lora --name e2e_lora \
           --variants eager,inductor,liger,cce-exact,chronicals 2>&1 | grep "^e2e:\|^|" ;;
    e2e-long) timeout "${secs:-540}" $E2E --precompile 0 --shapes qwen0.5b-16x4096 --modes full --name e2e_16x4096 \
           --variants "${E2E_LONG_VARIANTS:-eager,inductor,liger,cce-exact,chronicals}" 2>&1 | grep "^e2e:\|^|" ;;
    e2e-ours) timeout "${secs:-300}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e_ours \
           --variants inductor,chronicals,chronicals-all,chronicals-lean,chronicals-tuned,chronicals-bigchunk,chronicals-lowmem 2>&1 | grep "^e2e:\|^|" ;;
    e2e-cce-lean) timeout "${secs:-300}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e_cce_lean \
           --variants inductor,chronicals,chronicals-cce-lean 2>&1 | grep "^e2e:\|^|" ;;
    e2e-epilogue) timeout "${secs:-380}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e_epilogue \
           --variants "${E2E_EPILOGUE_VARIANTS:-inductor,chronicals,chronicals-no-epilogue}" 2>&1 | grep "^e2e:\|^|" ;;
    e2e-all-lean) timeout "${secs:-240}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e_all_lean \
           --variants chronicals-all,chronicals-lean 2>&1 | grep "^e2e:\|^|" ;;
    e2e-lora-bf16) timeout "${secs:-480}" $E2E --shapes qwen0.5b-8x2048 --modes lora --name e2e_lora_bf16 \
           --lora-adapter-dtype model --variants "${E2E_LORA_VARIANTS:-eager,inductor,liger,chronicals}" 2>&1 | grep "^e2e:\|^|" ;;
    lce-peers) timeout "${secs:-300}" python3 benchmarks/bench_linear_cross_entropy.py --budget $(( ${secs:-300} - 30 )) \
           --shapes 32768,4096,128256 16384,896,151936 8192,2304,256000 2>&1 \
           | grep -v Warning | tee "$OUT/lce.md" | tail -40 ;;
    lce-frozen) timeout "${secs:-120}" python3 benchmarks/bench_linear_cross_entropy.py --frozen-weight 2>&1 \
      | grep -v Warning | tee "$OUT/lce_frozen.md" | grep "^|" ;;
    lce-chunks) timeout "${secs:-150}" python3 benchmarks/bench_linear_cross_entropy.py --sweep --chunk-rows 1024 2048 4096 8192 16384 2>&1 \
           | grep -v Warning | tee "$OUT/lce_chunks.md" | tail -12 ;;
    cce-rows) timeout "${secs:-60}" python3 benchmarks/bench_cce_rows.py 2>&1 | grep -v Warning \
           | tee "$OUT/cce_rows.md" | grep "^|" ;;
    dgated-stages) timeout "${secs:-150}" python3 benchmarks/bench_quack_dgated_stages.py ${DGATED_ARGS:-} 2>&1 \
           | grep -v Warning | tee "$OUT/dgated_stages.md" | grep "^|" ;;
    dgated-ncu) timeout "${secs:-120}" ncu --profile-from-start off --clock-control none --section SpeedOfLight \
           --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats --section LaunchStats \
           --section Occupancy python3 benchmarks/ncu_dgated.py 2>&1 | grep -v Warning | tee "$OUT/dgated_ncu.txt" | tail -90 ;;
    quack-launch) timeout "${secs:-120}" python3 benchmarks/bench_quack_launch.py 2>&1 | grep -v Warning \
           | tee "$OUT/quack_launch.md" | tail -12 ;;
    attention) timeout "${secs:-90}" python3 benchmarks/bench_attention.py ${ATTENTION_ARGS:-} 2>&1 | grep -v Warning \
           | tee "$OUT/attention.md" | grep "^|" ;;
    e2e-gqa) timeout "${secs:-200}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e_gqa \
           --variants inductor,chronicals,chronicals-gqa,chronicals-rope 2>&1 | grep "^e2e:\|^|" ;;
    e2e-levers) timeout "${secs:-300}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e_levers \
           --variants inductor,chronicals,chronicals-gqa,chronicals-cudagraphs 2>&1 | grep "^e2e:\|^|" ;;
    e2e-pdl) timeout "${secs:-330}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e_pdl \
           --variants "${E2E_PDL_VARIANTS:-inductor,chronicals,chronicals-pdl,inductor-pdl}" 2>&1 | grep "^e2e:\|^|" ;;
    e2e-paired) timeout "${secs:-420}" python3 benchmarks/e2e_paired.py --commit "$COMMIT" --out "$OUT" --name e2e_paired \
           --precompile "${E2E_PRECOMPILE:-3}" --budget $(( ${secs:-420} - 15 )) --rounds "${E2E_PAIRED_ROUNDS:-30}" \
           --variants "${E2E_PAIRED_VARIANTS:-inductor,chronicals,chronicals-levers27,chronicals-pdl,chronicals-nomix,chronicals-keep-w1,inductor-pdl}" \
           2>&1 | grep "^e2e_paired:\|^|" ;;
    e2e-rope) timeout "${secs:-300}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e_rope \
           --variants inductor,chronicals,chronicals-rope,chronicals-cudagraphs,chronicals-rope-cudagraphs 2>&1 | grep "^e2e:\|^|" ;;
    concat-micro) timeout "${secs:-60}" python3 benchmarks/bench_concat_linear.py 2>&1 | tee "$OUT/concat_micro.md" | grep "^|" ;;
    mlp-epilogue) timeout "${secs:-120}" python3 benchmarks/bench_mlp_epilogue.py 2>&1 | tee "$OUT/mlp_epilogue.md" | grep -v Warning ;;
    lora-micro) timeout "${secs:-60}" python3 benchmarks/bench_lora_linear.py 2>&1 | tee "$OUT/lora_micro.md" | grep "^|" ;;
    e2e-concat) timeout "${secs:-300}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e_concat \
           --variants inductor,chronicals,chronicals-concat 2>&1 | grep "^e2e:\|^|" ;;
    e2e-lora-levers) timeout "${secs:-420}" $E2E --shapes qwen0.5b-8x2048 --modes lora --name e2e_lora_levers \
           --lora-adapter-dtype model --variants inductor,chronicals,chronicals-lora-linear,chronicals-concat,chronicals-lora-fused 2>&1 | grep "^e2e:\|^|" ;;
    e2e-autotune) timeout "${secs:-420}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e_autotune \
           --variants inductor,chronicals-autotune 2>&1 | grep "^e2e:\|^|" ;;
    row-sweep) timeout "${secs:-120}" python3 benchmarks/bench_linear_cross_entropy.py --row-sweep 2>&1 \
           | grep -v Warning | tee "$OUT/lce_rows.md" | grep "^|" ;;
    e2e-cce) timeout "${secs:-300}" $E2E --shapes qwen0.5b-8x2048 --modes full --name e2e_cce \
           --variants inductor,chronicals,chronicals-chunk4096,chronicals-chunk8192,chronicals-lean,chronicals-tuned 2>&1 | grep "^e2e:\|^|" ;;
    micro-norm) timeout "${secs:-200}" python3 benchmarks/gpu_micro.py --ops rms_norm add_rms_norm --out "$OUT" 2>&1 \
           | grep -v Warning | grep "^##\|^|" ;;
    e2e-llama) timeout "${secs:-300}" $E2E --shapes llama1b-8x2048 --modes full --name e2e_llama1b \
           --variants eager,inductor,liger,chronicals 2>&1 | grep "^e2e:\|^|" ;;
    saved-lora) timeout "${secs:-200}" python3 benchmarks/saved_activations.py --device cuda --layers 4 --batch 8 --seq 2048 \
           --lora-r 32 --variants chronicals,chronicals-no-lora-linear 2>&1 | grep -v Warning | tee "$OUT/saved_lora.md" | tail -14 ;;
    forward-host) timeout "${secs:-240}" python3 benchmarks/bench_forward_host.py --out "$OUT" 2>&1 | grep -v Warning | tail -120 ;;
    host-overhead) timeout "${secs:-120}" python3 benchmarks/bench_host_overhead.py --out "$OUT" 2>&1 | grep -v Warning | tail -60 ;;
    profile) timeout "${secs:-120}" python3 benchmarks/profile_step.py --commit "$COMMIT" --out "$OUT" --name profile \
           --variants "${PROFILE_VARIANTS:-inductor,chronicals}" 2>&1 | grep -v Warning | tail -30 ;;
    profile-lora) timeout "${secs:-180}" python3 benchmarks/profile_step.py --commit "$COMMIT" --out "$OUT" --name profile_lora \
           --lora-r 32 --lora-adapter-dtype model --variants "${PROFILE_VARIANTS:-inductor,chronicals}" 2>&1 | grep -v Warning | tail -30 ;;
    micro-rope) timeout "${secs:-90}" python3 benchmarks/gpu_micro.py --ops rope --out "$OUT" 2>&1 \
           | grep -v Warning | grep "^##\|^|" ;;
    preamble) timeout "${secs:-150}" python3 benchmarks/step_preamble.py --device cuda --out "$OUT" 2>&1 | grep "^|" ;;
    micro) timeout "${secs:-400}" python3 benchmarks/gpu_micro.py --ops rms_norm add_rms_norm swiglu rope --out "$OUT" 2>&1 \
           | grep -v Warning | grep "^##\|^|" ;;
    lce) timeout "${secs:-300}" python3 benchmarks/bench_linear_cross_entropy.py --sweep 2>&1 \
           | grep -v Warning | tee "$OUT/lce_sweep.md" | tail -40 ;;
    rms-sweep) timeout "${secs:-240}" python3 benchmarks/bench_rms_norm.py --sweep-bwd 2>&1 \
           | grep -v Warning | tee "$OUT/rms_norm_bwd_sweep.md" | tail -40 ;;
    multi) timeout "${secs:-300}" python3 -m pytest tests/gpu_multi -q -p no:cacheprovider -o addopts="" -W ignore 2>&1 \
           | tee "$OUT/gpu_multi_tests.log" | tail -15 ;;
    dist) timeout "${secs:-300}" python3 benchmarks/bench_distributed.py --commit "$COMMIT" --out "$OUT" --name dist \
           --gpus 2 --preset qwen2.5-0.5b --global-batch 8 --seq 2048 --steps 10 --warmup 3 --timeout 115 2>&1 \
           | grep "^bench_distributed:\|^|\|^      " ;;
    *) echo "unknown stage $name" ;;
  esac
done
