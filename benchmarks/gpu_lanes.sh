#!/usr/bin/env bash
# Several gpu_session.sh stage lists at once, one GPU each, on a multi-GPU device kind: the device
# time is the machine's, so 4 GPUs run 4 lanes for the price of one. Each lane sees only its GPU(s)
# (CUDA_VISIBLE_DEVICES), writes under $OUT/lane<i>/, and is stopped at LANE_SECONDS; then everything
# is packed into $OUT/results.tgz (a call brings back at most 8 files) beside $OUT/lanes.log.
# Usage: CHRONICALS_COMMIT=<sha> LANE_SECONDS=540 bash benchmarks/gpu_lanes.sh "0:e2e" "1:e2e-lora" "2,3:multi"
# Timing caveat recorded with the results: lanes share the host's CPUs (compiles in one lane while
# another times steps); the H200 hosts have 16 cores per GPU.
set -uo pipefail
OUT="${OUT:-benchmarks/results/lanes}"; mkdir -p "$OUT"
S=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S .whl/*.whl 2>&1 | grep -v WARN | tail -2
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "(editable install failed)"
export CHRONICALS_SKIP_INSTALL=1
i=0; pids=()
for lane in "$@"; do
  gpus="${lane%%:*}"; stages="${lane#*:}"
  mkdir -p "$OUT/lane$i"
  echo "lane$i: GPUs $gpus: $stages" | tee -a "$OUT/lanes.log"
  # shellcheck disable=SC2086
  (CUDA_VISIBLE_DEVICES="$gpus" OUT="$OUT/lane$i" timeout "${LANE_SECONDS:-540}" \
     bash benchmarks/gpu_session.sh $stages > "$OUT/lane$i/session.log" 2>&1) &
  pids+=($!); i=$((i + 1))
done
wait "${pids[@]}"
for d in "$OUT"/lane*/; do echo "######## $d"; grep -v "^\s*$" "$d/session.log" | tail -40; done >> "$OUT/lanes.log"
(cd "$OUT" && tar czf results.tgz lane*/)
rm -rf "$OUT"/lane*/
cat "$OUT/lanes.log" | cut -c1-400
