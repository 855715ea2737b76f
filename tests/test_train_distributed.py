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
    """Flags of a tiny run on the cached phantom: micro 2, total 4, no evaluation unless asked, no
    vision warm-up unless asked (these runs test the machinery)."""
    return [
        "--cache", str(cache), "--out", str(out), "--phantom-n", str(N),
        "--resolution", "cpu-micro", "--vision", "vit-micro", "--llm", "llm-micro",
        "--micro-batch", "2", "--total-batch", "4", "--lr", "1e-3", "--save-every", "2",
        "--vision-warmup-steps", "0", *extra,
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
    if (out / "export").exists():  # generate preprocesses raw NIfTI as these shards were written
        prep = json.loads((out / "export" / "preprocessing.json").read_text())
        assert prep["resample"] == "stretch" and prep["target_spacing"] is None
    return summary


# The ZeRO-3 runs also train the auxiliary finding head (a parameter outside the LLM and the export).
ZERO3_FLAGS = ("--max-steps", "3", "--eval-limit", "3", "--eval-batch", "1", "--max-new-tokens", "12")
ZERO3_FLAGS += ("--set", "findings_loss=0.5")


@pytest.fixture(scope="module")
def zero3_run(cache, tmp_path_factory) -> Path:
    """ZeRO-3 on two ranks, evaluating 3 volumes in batches of 1 (rank 1 makes one padding call)."""
    out = tmp_path_factory.mktemp("zero3") / "run"
    flags = ZERO3_FLAGS
    run(deepspeed_two_ranks("zero3") + tiny_flags(cache, out, *flags))
    return out


def test_zero3_evaluation_from_a_replica_equals_per_token_gathering(cache, zero3_run, tmp_path):
    """The replica each rank builds once per evaluation generates what DeepSpeed's per-token
    gathering generates (the old path, forced with HILT_ZERO3_EVAL=per-token), same run."""
    out = tmp_path / "per_token"
    flags = ZERO3_FLAGS
    run(deepspeed_two_ranks("zero3") + tiny_flags(cache, out, *flags), {"HILT_ZERO3_EVAL": "per-token"})
    modes = [
        json.loads((d / "summary.json").read_text())["final"]["zero3_eval"]["mode"] for d in (zero3_run, out)
    ]
    assert modes == ["replica", "per-token gathering"]
    assert train_losses(out) == train_losses(zero3_run)
    assert read_jsonl(out / "predictions.jsonl") == read_jsonl(zero3_run / "predictions.jsonl")


def test_zero2_two_ranks_train_and_checkpoint(cache, tmp_path):
    out = tmp_path / "zero2"
    run(deepspeed_two_ranks("zero2") + tiny_flags(cache, out, "--max-steps", "3", "--no-eval"))
    check_two_rank_run(out)


def test_zero3_two_ranks_train_checkpoint_and_evaluate(zero3_run):
    summary = check_two_rank_run(zero3_run)
    rows = [r for r in read_jsonl(zero3_run / "metrics.jsonl") if r["kind"] == "train"]
    assert all(0 < r["findings_loss"] < r["loss"] for r in rows)  # logged, and a part of the loss
    keys = [r["key"] for r in read_jsonl(zero3_run / "predictions.jsonl")]
    assert len(keys) == 3 == len(set(keys)) and summary["final"]["n"] == 3
    # The recipe's finding tokens: every prediction carries the head's 18 probabilities, scored.
    assert all(len(r["finding_probs"]) == 18 for r in read_jsonl(zero3_run / "predictions.jsonl"))
    assert "head_auc_macro" in summary["final"] and "head_auc_macro" not in summary["baseline_constant_report"]
    assert {"average", "ce_micro_f1"} <= set(summary["final"]) and "average" in summary[
        "baseline_constant_report"
    ]
    assert (zero3_run / "curves.png").stat().st_size > 1000
    # Partitioned parameters have numel 0 on each rank: the counts must be the full sizes.
    assert 0 < summary["params"]["trainable"] < summary["params"]["total"]
    assert summary["versions"]["deepspeed"] and summary["versions"]["transformers"]
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


# ---- issue 15: reliability of checkpoints, resume, bad data and generate (trainer side) ----


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def tag_files(tag: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(tag.iterdir())}


PY_ZERO2 = [sys.executable, TRAIN, "--ds", "ds_configs/zero2.json"]


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory) -> Path:
    """A finished one-process ZeRO-2 run of 4 steps with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(PY_ZERO2 + tiny_flags(cache, out, "--max-steps", "4", "--no-eval"))
    return out


def test_resuming_a_finished_run_never_rewrites_its_checkpoint(cache, finished, tmp_path):
    """Case 2: the resumed finished run does not save into LATEST's tag (a kill there lost it)."""
    out = copy_run(finished, tmp_path / "run")
    tag = out / "checkpoints" / "step00000004"
    before = tag_files(tag)
    # Were anything written into the tag, the process would die mid-write (as in the issue).
    run(
        PY_ZERO2 + tiny_flags(cache, out, "--max-steps", "4", "--no-eval", "--resume"),
        {"HILT_SCALE_KILL_IN_SAVE": "4:write"},
    )
    assert tag_files(tag) == before
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step00000004"
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_resume_falls_back_from_a_truncated_tag_to_the_older_intact_one(cache, finished, tmp_path):
    """Case 2 / 8: a truncated file in LATEST's tag is named; step 2 resumes; the result is exact."""
    out = copy_run(finished, tmp_path / "run")
    bad = out / "checkpoints" / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    proc = run(PY_ZERO2 + tiny_flags(cache, out, "--max-steps", "4", "--no-eval", "--resume"))
    said = proc.stdout + proc.stderr
    assert str(bad) in said and "truncated" in said and "step00000002" in said
    assert "resumed at step 2" in proc.stdout
    assert train_losses(out) == train_losses(finished)
    a, b = export_tensors(finished), export_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vision_warmup_keeps_the_main_phase_data_order_and_a_resume_skips_it(cache, tmp_path):
    """--vision-warmup-steps: the main phase trains on the same keys in the same order as without
    it (the warm-up has its own shuffle) from warmed vision weights; a resumed run does not warm
    up again (its checkpoint holds the warmed weights)."""
    flags = ("--no-eval", "--trace-keys", "--set", "findings_loss=0.5")
    plain, warm = tmp_path / "plain", tmp_path / "warm"
    run(PY_ZERO2 + tiny_flags(cache, plain, "--max-steps", "2", *flags))
    proc = run(PY_ZERO2 + tiny_flags(cache, warm, "--max-steps", "2", *flags, "--vision-warmup-steps", "3"))
    assert "vision warm-up step 3/3" in proc.stdout

    def keys(out: Path) -> list[str]:
        return json.loads((out / "keys.rank0.json").read_text())

    assert keys(warm) == keys(plain) and len(keys(plain)) == 8
    summary = json.loads((warm / "summary.json").read_text())
    assert summary["vision_warmup"]["steps"] == 3
    assert json.loads((plain / "summary.json").read_text())["vision_warmup"] is None
    a, b = export_tensors(plain), export_tensors(warm)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("vision."))
    more = ("--max-steps", "3", "--allow-change", "max_steps", "--resume", "--vision-warmup-steps", "3")
    proc = run(PY_ZERO2 + tiny_flags(cache, warm, *flags, *more))
    assert "resumed at step 2" in proc.stdout and "vision warm-up" not in proc.stdout
    assert json.loads((warm / "summary.json").read_text())["vision_warmup"] is None


def test_resume_refuses_a_changed_model_data_set_and_zero_stage_by_name(cache, finished, tmp_path):
    """Case 8: named before DeepSpeed's own assertions (which said nothing of what changed)."""
    out = copy_run(finished, tmp_path / "run")
    cmd = [sys.executable, TRAIN, "--ds", "ds_configs/zero3.json"]
    flags = tiny_flags(cache, out, "--max-steps", "4", "--no-eval", "--resume", "--set", "vision.depth=3")
    proc = run(cmd + flags + ["--phantom-n", "20"], check=False)
    assert proc.returncode != 0
    for change in ("model.vision.depth: 2 -> 3", "config.phantom_n: 24 -> 20", "zero_stage: 2 -> 3"):
        assert change in proc.stderr, proc.stderr[-3000:]


PAYLOAD = """
import sys, torch
class Payload:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))
torch.save({"module": Payload(), "optimizer_state_dict": Payload()}, sys.argv[1])
"""


def test_a_payload_planted_in_deepspeed_files_never_runs(cache, finished, tmp_path):
    """Case 5: DeepSpeed's loader used torch.load(weights_only=False) on these files."""
    from hilt_scale.training import checkpoint

    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        out = copy_run(finished, tmp_path / name)
        tag = out / "checkpoints" / "step00000004"
        marker = tmp_path / f"PWNED-{name}"
        subprocess.run([sys.executable, "-c", PAYLOAD, str(tag / name), str(marker)], check=True)
        if (tag / "manifest.json").exists():  # the manifest is a checksum, no signature: refresh it
            manifest = json.loads((tag / "manifest.json").read_text())
            checkpoint.write_manifest(tag, 4, manifest["run"])
        proc = run(
            PY_ZERO2 + tiny_flags(cache, out, "--max-steps", "4", "--no-eval", "--resume"), check=False
        )
        assert proc.returncode != 0
        assert not marker.exists(), f"the payload in {name} ran"
        assert str(tag / name) in proc.stderr and "refused to load" in proc.stderr, proc.stderr[-3000:]


def corrupt_copy(cache: Path, dst: Path, splits: tuple[str, ...]) -> tuple[Path, dict[str, str]]:
    """A copy of the phantom shard set with the volume of the first sample of each split damaged."""
    import shutil

    shards = Path(build_default(cache, N, SIZE, 0)[0])
    shutil.copytree(shards, dst)
    index = json.loads((dst / "index.json").read_text())
    bad = {}
    for split in splits:
        shard = next(s for s in index["shards"] if s["split"] == split)
        offset, size = shard["members"][0]["vol.zst"]
        with open(dst / shard["name"], "r+b") as f:
            f.seek(offset + size // 2)
            f.write(bytes(64))
        bad[split] = shard["keys"][0]
    return dst, bad


def test_on_error_skip_counts_bad_volumes_and_keeps_every_good_one(cache, tmp_path):
    """Case 7: one bad training and one bad validation volume are skipped, counted, nothing else lost."""
    data, bad = corrupt_copy(cache, tmp_path / "shards", ("train", "valid"))
    out = tmp_path / "run"
    flags = (
        "--data",
        str(data),
        "--on-error",
        "skip",
        "--epochs",
        "1",
        "--trace-keys",
        "--max-new-tokens",
        "4",
    )
    run(PY_ZERO2 + tiny_flags(cache, out, *flags))
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["skipped"]["train"].values()) == 1 and sum(summary["skipped"]["eval"].values()) == 1
    index = json.loads((data / "index.json").read_text())
    keys = {
        sp: {k for s in index["shards"] if s["split"] == sp for k in s["keys"]} for sp in ("train", "valid")
    }
    assert set(json.loads((out / "keys.rank0.json").read_text())) == keys["train"] - {bad["train"]}
    predicted = {r["key"] for r in read_jsonl(out / "predictions.jsonl")}
    assert predicted == keys["valid"] - {bad["valid"]} and summary["final"]["n"] == len(predicted)
    assert summary["eval_errors"] == [] and (out / "export" / "config.json").exists()


def test_a_failing_evaluation_keeps_the_export_and_summary(cache, tmp_path):
    """Case 7: under --on-error raise a bad eval volume is a clear error, after export and summary."""
    data, bad = corrupt_copy(cache, tmp_path / "shards", ("valid",))
    out = tmp_path / "run"
    flags = ("--data", str(data), "--max-steps", "2", "--max-new-tokens", "4")
    proc = run(PY_ZERO2 + tiny_flags(cache, out, *flags), check=False)
    assert proc.returncode != 0
    assert (out / "export" / "config.json").exists() and (out / "export" / "vision.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final"] is None
    (error,) = summary["eval_errors"]
    assert bad["valid"] in error and str(data) in error
    assert "evaluation failed" in proc.stderr


def test_generate_writes_the_good_reports_and_names_the_bad_files(cache, zero3_run, tmp_path):
    """Case 9: one unreadable NIfTI among good ones: the good reports are written, the bad one named."""
    import shutil

    scans = tmp_path / "scans"
    scans.mkdir()
    good = sorted(Path(cache).rglob("valid_*.nii.gz"))[:2]
    for p in good:
        shutil.copy(p, scans / p.name)
    broken = scans / f"{good[0].name[:-7]}_broken.nii.gz"  # sorts between the two good ones
    broken.write_bytes(b"not a nifti file")
    proc = run(
        [
            sys.executable,
            "-m",
            "hilt_scale.generate",
            "--run",
            str(zero3_run),
            str(scans),
            "--out",
            str(tmp_path / "g"),
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert str(broken) in proc.stderr
    records = read_jsonl(tmp_path / "g.jsonl")
    assert [r["key"] for r in records] == sorted(p.name[:-7] for p in good)
    text = (tmp_path / "g.txt").read_text()
    assert all(r["key"] in text and r["generated"] for r in records)


def test_chaos_kills_during_saves_and_resumes_end_exact(cache, tmp_path):
    """Three seeded kills of a 2-rank run (mid-write, before/after the manifest and pointer, in a
    resumed run's first save), each followed by --resume: the same losses and export as no kill."""
    import random

    def torchrun(out: Path, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), TRAIN,
            "--ds", "ds_configs/zero2.json",
            *tiny_flags(cache, out, "--max-steps", "5", "--save-every", "1", "--no-eval", *extra),
        ]  # fmt: skip

    straight, chaos = tmp_path / "straight", tmp_path / "chaos"
    run(torchrun(straight))
    rng = random.Random(0)  # kills 3:pointer, 4:trainer (the resumed run's first save), 5:write
    # Three different moments of a save, at seeded steps: the first after a checkpoint exists,
    # the second in the first save of the resumed run, the third one or two steps later.
    phases = rng.sample(["write", "trainer", "manifest", "pointer"], 3)
    resumed, kills = 0, []
    for n, phase in enumerate(phases):
        step = rng.randint(2, 3) if n == 0 else resumed + 1 if n == 1 else min(5, resumed + rng.randint(1, 2))
        kills.append(f"{step}:{phase}")
        proc = run(torchrun(chaos, "--resume"), {"HILT_SCALE_KILL_IN_SAVE": kills[-1]}, check=False)
        assert proc.returncode != 0, (kills, proc.stdout[-2000:])
        pointer = chaos / "checkpoints" / "LATEST"
        resumed = int(pointer.read_text().strip()[4:12]) if pointer.exists() else 0
        if resumed >= 5:  # killed after the last save: the run is complete on disk
            break
    run(torchrun(chaos, "--resume"))
    assert train_losses(chaos) == train_losses(straight), kills
    a, b = export_tensors(straight), export_tensors(chaos)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kills


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(cache, tmp_path):
    """Preemption (issue 23): SIGTERM after step 2 finishes the step, saves, writes summary.json
    with "stopped" and exits 75; --resume then gives the losses and weights of a run never stopped."""
    from hilt_scale.training.preempt import EXIT_STOPPED

    flags = ("--max-steps", "4", "--save-every", "0", "--no-eval")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(PY_ZERO2 + tiny_flags(cache, straight, *flags))
    proc = run(
        PY_ZERO2 + tiny_flags(cache, stopped, *flags), {"HILT_SCALE_SIGNAL_AT_STEP": "2:SIGTERM"}, False
    )
    assert proc.returncode == EXIT_STOPPED, proc.stderr[-3000:]
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["stopped"] == "SIGTERM" and summary["steps"] == 2
    assert (stopped / "checkpoints" / "LATEST").read_text().strip() == "step00000002"
    run(PY_ZERO2 + tiny_flags(cache, stopped, *flags, "--resume"))
    assert train_losses(stopped) == train_losses(straight)
    a, b = export_tensors(straight), export_tensors(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_training_volume_bad_under_skip_stops_counting_the_skips(cache, tmp_path):
    """Hang case 1 (issue 23): with every training volume damaged, --on-error skip skipped empty
    batches forever with no output; now the run stops with an error counting the skips by reason."""
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(Path(build_default(cache, N, SIZE, 0)[0]), data)
    index = json.loads((data / "index.json").read_text())
    for shard in (s for s in index["shards"] if s["split"] == "train"):
        with open(data / shard["name"], "r+b") as f:
            for m in shard["members"]:
                offset, size = m["vol.zst"]
                f.seek(offset + size // 2)
                f.write(bytes(32))
    proc = run(PY_ZERO2 + tiny_flags(cache, tmp_path / "run", "--data", str(data), "--on-error", "skip",
                                     "--max-steps", "3", "--no-eval"), check=False)  # fmt: skip
    assert proc.returncode not in (0, 75)
    assert "no_good_samples" in proc.stderr and "corrupt_zstd" in proc.stderr, proc.stderr[-3000:]


def test_chaos_two_ranks_sigterm_and_a_missing_shard_under_skip(cache, tmp_path):
    """Chaos, issue 23: two ranks train under --on-error skip with one training shard missing; one
    rank gets SIGTERM after step 2, both stop there together (exit 75, one checkpoint), --resume
    finishes, and summary.json counts the missing shard's samples as missing_shard."""
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(Path(build_default(cache, N, SIZE, 0)[0]), data)
    index = json.loads((data / "index.json").read_text())
    gone = next(s for s in index["shards"] if s["split"] == "train")
    (data / gone["name"]).unlink()

    def torchrun(out: Path, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), TRAIN,
            "--ds", "ds_configs/zero2.json",
            *tiny_flags(cache, out, "--data", str(data), "--on-error", "skip", "--max-steps", "4",
                        "--save-every", "0", "--no-eval", "--no-export", *extra),
        ]  # fmt: skip

    out = tmp_path / "run"
    proc = run(torchrun(out), {"HILT_SCALE_SIGNAL_AT_STEP": "2:SIGUSR1:1"}, check=False)
    assert proc.returncode != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "SIGUSR1" and summary["steps"] == 2
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step00000002"
    run(torchrun(out, "--resume"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "stopped" not in summary
    assert set(summary["skipped"]["train"]) == {"missing_shard"}
    assert summary["skipped"]["train_reports"] == {"missing_shard": len(gone["keys"])}


def test_a_second_trainer_into_the_same_run_directory_is_refused(cache, tmp_path):
    """Minor case (issue 23): two trainers into one --out interleaved their checkpoints (no lock)."""
    from shards.io import lock_dir

    out = tmp_path / "run"
    fd = lock_dir(out, "the first trainer")
    try:
        proc = run(PY_ZERO2 + tiny_flags(cache, out, "--max-steps", "1", "--no-eval"), check=False)
    finally:
        os.close(fd)
    assert proc.returncode != 0 and "in use by the first trainer" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "checkpoints").exists()
