#!/usr/bin/env bash
# The project's GPU measurements in ONE call of the device tool (issue 24), in priority order:
#   1. env            versions, GPU name (and the carried wheels installed)
#   2. kernel_tests   the bf16 kernel tests vs float64 (attention terms; C768 K is V at N = 32768)
#   3. kernel_bench   python -m hilt_kernels.bench --quick: do_bench + CUDA-graph times, a
#                     torch.profiler split of one fwd+bwd, attention-term errors (rows appended as
#                     they finish: a timeout keeps them)
#   4. bench_step_zero2  python -m hilt_scale.bench_step --via-deepspeed: the HILT training step
#                     (vit-base + llama3-8b + LoRA, paper size, bf16, checkpointing on, micro-batch 1)
#                     plain and through DeepSpeed ZeRO-2 (bf16, torch AdamW), with the ViT / LLM parts
#   5. kernel_sweep   only when the budget has room (or GPU_CHECK_ONLY=kernel_sweep): v2 tile variants
# Every result is appended to $OUT/results.jsonl after its step and every step's output to
# $OUT/gpu_check.log: two files (the device returns at most 8). Each step runs under its own
# timeout; the timeouts of steps 1-4 (365 s) sum to less than the budget (GPU_CHECK_BUDGET_S, 370 s,
# counted after the wheel install, ~10 s).
#
# Device tool: command "bash tests/gpu/gpu_check.sh", carry [".whl"] (tests/gpu/gpu_wheels.sh
# builds it), timeout_s 420. GPU_CHECK_ONLY="kernel_bench zero2" runs only the named steps.
# CPU dry run (CI runs it: tests/test_kernel_gpu_script.py): OUT=DIR bash tests/gpu/gpu_check.sh --cpu-dry
# -- the same steps and files, Triton interpreter, tiny shapes and models.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[[ "${1:-}" == "--cpu-dry" ]] && DRY=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
LOG="$OUT/gpu_check.log"
BUDGET=${GPU_CHECK_BUDGET_S:-370}
ONLY=${GPU_CHECK_ONLY:-}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
PY=${PYTHON:-python3}
T0=$SECONDS
rm -rf "$WORK/bench_step" "$WORK/kernel_tests.xml"  # no stale results from an earlier run
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HILT_SCALE_CACHE=$WORK/cache

wanted() { [[ -z "$ONLY" || " $ONLY " == *" $1 "* ]]; }
# step NAME MAX_SECONDS [--json FILE]... -- CMD...: run CMD under timeout min(MAX, budget left),
# its output appended to the log; then its status and JSON files appended to results.jsonl.
step() {
  local name=$1 want=$2 files=()
  shift 2
  while [[ $1 == --json ]]; do files+=("$2"); shift 2; done  # files the step leaves: JSON or JUnit XML
  [[ $1 == -- ]] && shift
  wanted "$name" || return 0
  want=$((want * SCALE))
  local left=$((BUDGET - (SECONDS - T0)))
  local t=$((want < left ? want : left))
  if ((t < 15)); then
    echo "SKIPPED $name: budget spent ($((SECONDS - T0)) s of $BUDGET)" | tee -a "$LOG"
    "$PY" tests/gpu/collect.py step "$RES" "$name" -1 0
    return 0
  fi
  echo "=== $name (timeout ${t}s, at $((SECONDS - T0)) s): $*" | tee -a "$LOG"
  local s=$SECONDS
  timeout -k 5 "$t" "$@" >> "$LOG" 2>&1
  local rc=$?
  "$PY" tests/gpu/collect.py step "$RES" "$name" "$rc" "$((SECONDS - s))" "${files[@]}"
  echo "--- $name rc=$rc in $((SECONDS - s)) s" | tee -a "$LOG"
}

: > "$LOG"
: > "$RES"
SCALE=1
if ((DRY)); then  # the interpreter, no CUDA; DeepSpeed on CPU (gloo)
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
  SCALE=${GPU_CHECK_DRY_SCALE:-4}  # the same plan with 4x the time: a shared CI CPU is slow
  BUDGET=$((BUDGET * SCALE))
  BS_ARGS=(--warmup 1 --steps 1)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader >> "$LOG" 2>&1
  # Carried wheels: only what the image lacks (deepspeed and its deps, webdataset, nibabel,
  # zstandard; bitsandbytes only where .whl_bnb is carried too).
  SITE=$WORK/site
  for d in .whl .whl_bnb; do
    if compgen -G "$d/*.whl" > /dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$d"/*.whl \
        >> "$LOG" 2>&1 || echo "FAIL installing $d" | tee -a "$LOG"
    fi
  done
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  BS_ARGS=(--warmup 2 --steps 3)
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the project without `pip install -e .` (no network)
echo "setup took $((SECONDS - T0)) s; the budget counts from here" | tee -a "$LOG"
T0=$SECONDS

step env 25 -- "$PY" tests/gpu/collect.py env "$RES"
step kernel_tests 80 --json "$WORK/kernel_tests.xml" -- "$PY" -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_kernels.py -rfEs --junitxml "$WORK/kernel_tests.xml"
step kernel_bench 110 -- "$PY" -m hilt_kernels.bench --quick --no-compile --step kernel_bench --out "$RES"
# One bench_step run gives both: the plain torch step (with the ViT / LLM parts) and the same step
# through DeepSpeed ZeRO-2 (bf16, torch AdamW); its JSON is rewritten after every row.
step bench_step_zero2 150 --json "$WORK/bench_step/bench_step.json" -- \
  "$PY" -m hilt_scale.bench_step --connectors hilt --micro-batch 1 --checkpointing on "${BS_ARGS[@]}" \
  --via-deepspeed --out "$WORK/bench_step"
step kernel_sweep 120 -- "$PY" -m hilt_kernels.bench --quick --no-compile --sweep --impls triton \
  --step kernel_sweep --out "$RES"

echo "=== summary ($((SECONDS - T0)) s of $BUDGET)" | tee -a "$LOG"
"$PY" tests/gpu/collect.py summary "$RES" | tee -a "$LOG"
