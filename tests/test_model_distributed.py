"""The model under DeepSpeed ZeRO-3 with 2 CPU ranks (gloo): QLoRA nf4 build, steps, synced generate.

Catches what one process cannot: e.g. transformers' save_pretrained writes on rank 0 only, which
once broke the nf4 build of a random-init LLM on every other rank.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("bitsandbytes")

WORKER = r"""
import json, sys, torch, deepspeed, torch.distributed as dist
from hilt_scale.model.config import model_config
from hilt_scale.model.mllm import build_model
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
reports = ["Findings: The heart is normal in size.", "Findings: Mild emphysema in both lungs."]
torch.manual_seed(0)
cfg = model_config(llm="llm-micro", resolution="cpu-micro", overrides={"llm.quantization": "nf4"})
model = build_model(cfg, texts=reports * 10)
hr = torch.zeros(2, 1, 16, 32, 32, dtype=torch.uint8)
hr[1] = 200
batch = model.collator()({"key": ["a", "b"], "hr": hr, "report": reports, "meta": [{}, {}]})
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
      "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds)
losses = []
for _ in range(3):
    loss = engine(batch)
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
texts = engine.module.generate(hr, max_new_tokens=5, synced_gpus=True)
with open(sys.argv[1] + f".{rank}", "w") as f:
    json.dump({"losses": losses, "texts": texts}, f)
"""


@pytest.mark.slow
def test_zero3_qlora_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = tmp_path / "result"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    root = Path(__file__).parents[1]
    # --standalone: the rendezvous takes a port the OS picks, so no race with other jobs for one.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(result)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"result.{r}").read_text()) for r in (0, 1)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # same batch on both ranks, one model
    assert all(0 < loss < 20 for loss in ranks[0]["losses"])
    assert ranks[0]["texts"] == ranks[1]["texts"] and len(ranks[0]["texts"]) == 2
