#!/usr/bin/env bash
# Everything the project measures on a GPU, in one call of the device tool (issue 11):
#   stack check, bench_step grid (5 connectors x checkpointing x micro-batch 1,2; 8B, bf16, LoRA),
#   QLoRA rows (70B nf4, 8B nf4), a short ZeRO-2 training run on the phantom at `normal`
#   resolution with vit-base (bf16, NCCL, evaluation, export), the loader bench at 256x512x512,
#   the GPU tests, the kernel bench (quick, then full), bench_step through DeepSpeed, ZeRO-3,
#   the vision probe (issue 14) with vit-tiny.
# Run from the project root (device tool: command "bash tests/gpu/gpu_check.sh", carry
# [".whl", ".whl_bnb", ".whl_eval"] built here by tests/gpu/gpu_wheels.sh). Needs nothing outside
# the project. Tables, JSON, PNGs and logs go to $OUT (the device tool's output folder; default
# ./gpu_out). Steps run in priority order, each under its own `timeout`, all under one budget
# (GPU_CHECK_BUDGET_S, default 470 s); a step the budget cannot fit is listed as SKIPPED.
# GPU_CHECK_ONLY="grid qlora70 ..." runs only the named steps (names: see `plan` below).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-470}
ONLY=${GPU_CHECK_ONLY:-}
T0=$SECONDS
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

SITE=${GPU_CHECK_SITE:-/tmp/site}
BG=()
trap 'for p in "${BG[@]}"; do kill "$p" 2>/dev/null; done' EXIT

note() { echo "$*" | tee -a "$SUMMARY"; }
# wait_for PID MAX_SECONDS NAME: wait for a background job, at most MAX_SECONDS (and the budget).
wait_for() {
  local pid=$1 max=$2 name=$3 s=$SECONDS
  while kill -0 "$pid" 2>/dev/null && ((SECONDS - s < max && SECONDS - T0 < BUDGET - 30)); do sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then note "TIMEOUT $name after $((SECONDS - s)) s"; kill "$pid"; return 1; fi
  wait "$pid"; local rc=$?; note "$name rc=$rc ($((SECONDS - s)) s waited, at $((SECONDS - T0)) s)"; return $rc
}
wanted() { [[ -z "$ONLY" || " $ONLY " == *" $1 "* ]]; }
# step NAME MAX_SECONDS CMD...: run CMD under timeout min(MAX, budget left), log to $OUT/NAME.log.
step() {
  local name=$1 want=$2; shift 2
  wanted "$name" || return 0
  local left=$((BUDGET - (SECONDS - T0) - 5))
  local t=$((want < left ? want : left))
  if ((t < 20)); then note "SKIPPED $name: budget spent ($((SECONDS - T0)) s of $BUDGET)"; return 0; fi
  echo "=== $name (timeout ${t}s, at $((SECONDS - T0)) s)"
  local s=$SECONDS
  timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local what="ok"; ((rc == 124 || rc == 137)) && what="TIMEOUT"; ((rc != 0 && rc != 124 && rc != 137)) && what="FAIL"
  note "$what $name rc=$rc $((SECONDS - s)) s (log $name.log)"
  grep -v '^{' "$OUT/$name.log" | tail -n 25
  return 0
}

# --- environment: carried wheels, the project on PYTHONPATH (no network: no `pip install -e .`).
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 --version | tee -a "$OUT/device.txt"
for d in .whl .whl_eval .whl_bnb; do
  if compgen -G "$d/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$d"/*.whl \
      || note "FAIL installing $d"
  else
    note "no $d/ carried (build it with tests/gpu/gpu_wheels.sh and carry it)"
  fi
done
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export HILT_SCALE_CACHE=/tmp/hilt-cache TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"
note "setup done at $((SECONDS - T0)) s"

# DeepSpeed configs with torch AdamW: ds_values picks FusedAdam on GPU, which JIT-compiles with
# nvcc; the carried pure-Python deepspeed wheel has no prebuilt ops and the image may lack nvcc.
python3 - "$OUT" <<'PY'
import json, sys
for stage in ("zero2", "zero3"):
    cfg = json.load(open(f"ds_configs/{stage}.json"))
    cfg["optimizer"]["params"]["torch_adam"] = True
    json.dump(cfg, open(f"{sys.argv[1]}/{stage}_torch_adam.json", "w"), indent=1)
PY

# --- CPU-side data prep in the background (16 cores; 2 processes each): the loader bench's
# shard set at the paper size and the training run's phantom default at `normal` size.
if wanted loader; then
  (python3 -m shards.phantom --out /tmp/ph512 --n 8 --size 256,512,512 --workers 2 \
    && python3 -m shards.write --ct-rate /tmp/ph512 --out /tmp/sh512 --hr-size 256,512,512 --stretch --workers 2 --no-progress) \
    > "$OUT/loader_prep.log" 2>&1 &
  PREP_LOADER=$!
  BG+=("$PREP_LOADER")
fi
if wanted train2 || wanted train3; then
  python3 -c "from pathlib import Path; from hilt_scale.training.data import build_default; print(build_default(Path('/tmp/hilt-cache'), 48, (128, 256, 256), 0))" \
    > "$OUT/train_prep.log" 2>&1 &
  PREP_TRAIN=$!
  BG+=("$PREP_TRAIN")
fi

# --- the stack: DeepSpeed ZeRO-2/3 on one GPU, webdataset+zstd, nibabel, bitsandbytes nf4.
cat > "$OUT/stack_check.py" <<'PY'
import os, tempfile, time, traceback
for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
    os.environ.setdefault(k, v)
import torch

def check(name, fn):
    t = time.time()
    try:
        print(f"OK   {name}: {fn()} ({time.time() - t:.1f}s)", flush=True)
    except Exception as e:
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}", flush=True); traceback.print_exc(limit=2)

def ds(stage):
    import deepspeed
    m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 16))
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    eng, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
    losses = []
    for _ in range(3):
        x = torch.randn(4, 256, device=eng.device, dtype=torch.bfloat16)
        loss = (eng(x) ** 2).mean(); eng.backward(loss); eng.step(); losses.append(round(loss.item(), 4))
    return f"deepspeed {deepspeed.__version__} losses {losses}"

def wds_zstd():
    import numpy as np, webdataset as wds, zstandard as zstd
    p = os.path.join(tempfile.mkdtemp(), "s-000000.tar")
    a = np.random.default_rng(0).integers(0, 255, (16, 32, 32), dtype=np.uint8)
    with wds.TarWriter(p) as w:
        w.write({"__key__": "v0", "vol.zst": zstd.ZstdCompressor().compress(a.tobytes()), "txt": "report"})
    s = next(iter(wds.WebDataset(p, shardshuffle=False)))
    b = np.frombuffer(zstd.ZstdDecompressor().decompress(s["vol.zst"]), np.uint8).reshape(a.shape)
    return f"roundtrip equal={bool((a == b).all())}"

def bnb():
    import bitsandbytes as bnb
    lin = bnb.nn.Linear4bit(512, 512, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", quant_storage=torch.bfloat16)
    w = torch.randn(512, 512)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16)
    lin = lin.cuda()
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = lin(x); y.float().sum().backward()
    ref = x.detach().float() @ w.cuda().T
    return f"bitsandbytes {bnb.__version__} nf4 rel err {((y.float() - ref).norm() / ref.norm()).item():.3f}, grad {x.grad is not None}"

print(torch.__version__, torch.cuda.get_device_name(), flush=True)
check("deepspeed zero2 bf16 1 rank", lambda: ds(2))
check("webdataset+zstd", wds_zstd)
check("nibabel", lambda: __import__("nibabel").__version__)
check("bitsandbytes 4-bit on cuda", bnb)
check("project imports", lambda: [__import__(m).__name__ for m in ("hilt_scale.bench_step", "hilt_scale.training.loop", "shards.read", "hilt_kernels")])
PY
step stack 60 python3 "$OUT/stack_check.py"

# --- the paper's compute claim: 8B + LoRA r128, bf16, 512 text tokens, paper resolution.
BS="python3 -m hilt_scale.bench_step --out $OUT --warmup 2 --steps 3"
step grid 240 $BS --name bench_step_8b --connectors hilt,all-tokens,pooled,2d,random-queries
step qlora70 150 $BS --name bench_step_70b_nf4 --llm llama3-70b --connectors hilt --micro-batch 1 --checkpointing on,off --no-parts
step qlora8 90 $BS --name bench_step_8b_nf4 --set llm.quantization=nf4 --connectors hilt --micro-batch 1

# --- a real short training run (ZeRO-2, bf16, NCCL), then evaluation and export.
[[ -n "${PREP_TRAIN:-}" ]] && wait_for "$PREP_TRAIN" 150 "train data prep"
TRAIN="hilt_scale/train.py --recipe phantom-cpu --vision vit-base --resolution normal --phantom-n 48 --micro-batch 2 --total-batch 4 --num-workers 2 --cache /tmp/hilt-cache --save-every 0"
step train2 200 python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port 29611 $TRAIN \
  --ds "$OUT/zero2_torch_adam.json" --max-steps 200 --eval-limit 8 --max-new-tokens 48 --num-beams 1 --out /tmp/run_zero2
if wanted train2; then
  cp /tmp/run_zero2/{summary.json,metrics.jsonl,predictions.jsonl,curves.png} "$OUT/" 2>/dev/null
  ls -la /tmp/run_zero2/export > "$OUT/train2_export_files.txt" 2>&1
fi

# --- the loader keeps up? samples/s per worker at 256x512x512 against the step's samples/s.
if [[ -n "${PREP_LOADER:-}" ]]; then
  wait_for "$PREP_LOADER" 120 "loader data prep" && step loader 90 python3 -m shards.bench /tmp/sh512 --split train --workers 1,2,4 --repeats 2
  PER=$(python3 -c "import json,sys; r=json.loads([l for l in open(sys.argv[1]) if l.startswith('{')][-1]); print([d for d in r['decode'] if d['workers']==1][0]['samples_per_s_per_worker'])" "$OUT/loader.log" 2>/dev/null)
  if [[ -n "$PER" && -f "$OUT/bench_step_8b.json" ]]; then
    note "loader samples/s per worker at 256x512x512: $PER"
    python3 -m hilt_scale.bench_step --from-json "$OUT/bench_step_8b.json" --loader-samples-per-s "$PER" --out "$OUT" --name bench_step_8b_loader > "$OUT/bench_step_8b_loader.log" 2>&1
  fi
fi

step pytest 120 python3 -m pytest -q -m gpu -p no:cacheprovider
step kernels_quick 90 python3 -m hilt_kernels.bench --quick --out "$OUT/kernel_bench_quick.json"
step deepspeed_step 120 $BS --name bench_step_8b_ds --connectors hilt --micro-batch 1 --via-deepspeed --no-parts
step train3 150 python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port 29612 $TRAIN \
  --ds "$OUT/zero3_torch_adam.json" --max-steps 5 --no-eval --out /tmp/run_zero3
wanted train3 && ls -la /tmp/run_zero3/export > "$OUT/train3_export_files.txt" 2>&1
step kernels_full 300 python3 -m hilt_kernels.bench --out "$OUT/kernel_bench.json"
# --- issue 14's vision probe at a scale the CPU cannot afford (vit-tiny, 15 epochs of 1350
# phantom volumes): can the visual tokens carry HR-only findings at all? Last: runs only when the
# budget has room, or alone with GPU_CHECK_ONLY=probe.
# Its phantom stays in /tmp (too big to bring back); the tables come back.
step probe 300 python3 -m hilt_scale.sweep.probe --out /tmp/probe --vision vit-tiny --epochs 15 \
  --variants hilt,lr-only,all-tokens --seeds 0 --device cuda
wanted probe && cp /tmp/probe/probe_results.{json,md} "$OUT/" 2>/dev/null

echo "=== summary ($((SECONDS - T0)) s of $BUDGET)"
cat "$SUMMARY"
for f in "$OUT"/bench_step_*.md; do [[ -f "$f" ]] && { echo "--- $f"; cat "$f"; }; done
