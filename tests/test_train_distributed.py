"""End-to-end trainer runs on CPU with gloo: ZeRO-2/3 on two ranks, exact resume after SIGKILL,
two "nodes" on loopback, and export -> generate reproducing the run's predictions.

Each run is a real subprocess (deepspeed launcher, torchrun or plain python) on a tiny phantom
(24 volumes of 16x32x32, llm-micro), built once per session into a temporary cache.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hilt_scale.training.data import build_default
from shards.io import read_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
TRAIN = "hilt_scale/train.py"
N, SIZE = 24, (16, 32, 32)


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    build_default(path, N, SIZE, seed=0)
    return path


def tiny_flags(cache: Path, out: Path, *extra: str) -> list[str]:
    """Flags of a tiny run on the cached phantom: micro 2, total 4, no evaluation unless asked."""
    return [
        "--cache", str(cache), "--out", str(out), "--phantom-n", str(N),
        "--resolution", "cpu-micro", "--vision", "vit-micro", "--llm", "llm-micro",
        "--micro-batch", "2", "--total-batch", "4", "--lr", "1e-3", "--save-every", "2", *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(cmd: list[str], extra_env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=400
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def export_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(out / "export" / "vision.safetensors")
    adapter = load_file(out / "export" / "adapter" / "adapter_model.safetensors")
    return {**tensors, **{f"adapter.{k}": v for k, v in adapter.items()}}


def deepspeed_two_ranks(ds: str) -> list[str]:
    return [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        TRAIN,
        "--ds",
        f"ds_configs/{ds}.json",
    ]


def check_two_rank_run(out: Path) -> dict:
    """3 finite losses, a complete checkpoint with both ranks' resume state, a summary of 2 ranks."""
    losses = train_losses(out)
    assert [s for s, _ in losses] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step00000003"
    tag = out / "checkpoints" / "step00000003"
    assert (tag / "trainer_rank0.pt").exists() and (tag / "trainer_rank1.pt").exists()
    assert any(tag.glob("*optim_states.pt"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    return summary


@pytest.fixture(scope="module")
def zero3_run(cache, tmp_path_factory) -> Path:
    """ZeRO-3 on two ranks, evaluating 3 volumes in batches of 1 (rank 1 makes one padding call)."""
    out = tmp_path_factory.mktemp("zero3") / "run"
    flags = ("--max-steps", "3", "--eval-limit", "3", "--eval-batch", "1", "--max-new-tokens", "12")
    run(deepspeed_two_ranks("zero3") + tiny_flags(cache, out, *flags))
    return out


def test_zero2_two_ranks_train_and_checkpoint(cache, tmp_path):
    out = tmp_path / "zero2"
    run(deepspeed_two_ranks("zero2") + tiny_flags(cache, out, "--max-steps", "3", "--no-eval"))
    check_two_rank_run(out)


def test_zero3_two_ranks_train_checkpoint_and_evaluate(zero3_run):
    summary = check_two_rank_run(zero3_run)
    keys = [r["key"] for r in read_jsonl(zero3_run / "predictions.jsonl")]
    assert len(keys) == 3 == len(set(keys)) and summary["final"]["n"] == 3
    assert {"average", "ce_micro_f1"} <= set(summary["final"]) and "average" in summary[
        "baseline_constant_report"
    ]
    assert (zero3_run / "curves.png").stat().st_size > 1000
    # Paper-table columns for `evaluate --compare`: cpu-micro LR 8x16x16 / patch 4x8x8 = 2*2*2 tokens.
    assert (summary["method"], summary["hr_size"], summary["visual_tokens"]) == ("hilt", [16, 32, 32], 8)


def test_resume_after_sigkill_is_exact(cache, tmp_path):
    """6 steps straight == 4 steps killed inside the step-4 save, then --resume (from step 2)."""
    cmd = [sys.executable, TRAIN, "--ds", "ds_configs/zero2.json"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(cmd + tiny_flags(cache, straight, "--max-steps", "6", "--no-eval"))
    proc = run(
        cmd + tiny_flags(cache, killed, "--max-steps", "6", "--no-eval"),
        {"HILT_SCALE_KILL_IN_SAVE": "4"},
        check=False,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    # The kill came after DeepSpeed wrote step 4 but before the pointer moved: step 2 resumes.
    assert (killed / "checkpoints" / "LATEST").read_text().strip() == "step00000002"
    assert not (killed / "export").exists()
    run(cmd + tiny_flags(cache, killed, "--max-steps", "6", "--no-eval", "--resume"))
    assert train_losses(killed) == train_losses(straight)
    assert [s for s, _ in train_losses(killed)] == [1, 2, 3, 4, 5, 6]
    a, b = export_tensors(straight), export_tensors(killed)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_two_nodes_on_loopback_see_each_sample_once(cache, tmp_path):
    out = tmp_path / "nodes"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
            TRAIN, "--ds", "ds_configs/zero2.json",
            *tiny_flags(cache, out, "--epochs", "1", "--no-eval", "--no-export", "--trace-keys"),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for p in procs:
        stdout, stderr = p.communicate(timeout=400)
        assert p.returncode == 0, stderr[-4000:]
    seen = [json.loads((out / f"keys.rank{r}.json").read_text()) for r in (0, 1)]
    index = json.loads((Path(build_default(cache, N, SIZE, 0)[0]) / "index.json").read_text())
    train_keys = {k for s in index["shards"] if s["split"] == "train" for k in s["keys"]}
    counts = Counter(seen[0] + seen[1])
    assert set(counts) == train_keys
    assert set(counts.values()) == {1}
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])


def test_export_reloads_and_generate_reproduces_predictions(cache, zero3_run, tmp_path):
    """The ZeRO-3 run's export, loaded in a fresh process without DeepSpeed, gives its predictions."""
    out = zero3_run
    predictions = {r["key"]: r for r in read_jsonl(out / "predictions.jsonl")}
    shards, _ = build_default(cache, N, SIZE, 0)
    # Shard-set input, then one NIfTI file of the same volume.
    run(
        [sys.executable, "-m", "hilt_scale.generate", "--run", str(out), shards, "--out", str(tmp_path / "g")]
    )
    generated = {r["key"]: r for r in read_jsonl(tmp_path / "g.jsonl")}
    for key, pred in predictions.items():
        assert generated[key]["generated"] == pred["generated"], key
        assert generated[key]["reference"] == pred["reference"]
    key = sorted(predictions)[0]
    nifti = next(Path(cache).rglob(f"{key}.nii.gz"))
    run(
        [
            sys.executable,
            "-m",
            "hilt_scale.generate",
            "--run",
            str(out),
            str(nifti),
            "--out",
            str(tmp_path / "n"),
        ]
    )
    (one,) = read_jsonl(tmp_path / "n.jsonl")
    assert one["key"] == key and one["generated"] == predictions[key]["generated"]
    assert key in (tmp_path / "n.txt").read_text()
