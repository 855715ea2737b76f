"""Trainer pieces that need no process group: CLI, DeepSpeed config filling, checkpoints, logs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hilt_scale.recipes import RECIPES, phantom_cpu
from hilt_scale.training import checkpoint
from hilt_scale.training.config import TrainConfig, build_parser, parse_args
from hilt_scale.training.data import constant_report
from hilt_scale.training.distributed import ds_values, fill_ds_config, grad_accum
from shards.io import read_jsonl, write_jsonl_atomic

ROOT = Path(__file__).parents[1]
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def test_cli_flags_override_the_recipe_and_accept_local_rank():
    cfg = parse_args(["--lr", "3e-4", "--set", "llm.lora_r=4", "--set", "vision.depth=1", "--local_rank=1"])
    assert cfg.recipe == "phantom-cpu" and cfg.lr == 3e-4
    assert cfg.epochs == phantom_cpu().epochs == 30.0  # the recipe's value where no flag is given
    assert cfg.set == [*phantom_cpu().set, "llm.lora_r=4", "vision.depth=1"]  # after the recipe's own
    assert cfg.local_rank == 1
    # --data changes nothing else: no default depends on another flag.
    own = parse_args(["--data", "/some/shards", "--no-eval"])
    assert own.lr == phantom_cpu().lr and own.epochs == 30.0 and own.eval is False
    real = parse_args(["--recipe", "ctrate-llama3-8b", "--data", "/d", "--epochs", "2"])
    assert (real.lr, real.total_batch, real.epochs, real.data) == (1e-4, 4, 2.0, "/d")
    assert (real.vision, real.llm, real.resolution) == ("vit-base", "llama3-8b", "paper")


def test_every_recipe_builds_its_model_config_and_help_lists_them():
    from hilt_scale.training.loop import run_model_config

    for name, fn in RECIPES.items():
        cfg = fn()
        assert cfg.recipe == name
        mcfg = run_model_config(cfg)  # presets and overrides resolve (meta shapes only, no weights)
        assert mcfg.resolution.name == cfg.resolution
    assert run_model_config(RECIPES["ctrate-llama3-70b-qlora"]()).llm.quantization == "nf4"
    text = build_parser().format_help()
    assert all(name in text for name in RECIPES)
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "no-such-recipe"])


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_auto_in_the_shipped_configs_is_filled(path):
    cfg = fill_ds_config(path, ds_values(TrainConfig(), world=2, total_steps=100))
    text = json.dumps(cfg)
    assert '"auto"' not in text
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 1  # total 4 = 2 micro x 2 ranks
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 3  # ratio 0.03 of 100
    assert cfg["bf16"]["enabled"] is torch.cuda.is_available()


def test_fill_ds_config_names_file_and_key_of_an_unknown_auto(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "mystery": "auto"}}))
    with pytest.raises(KeyError, match=r"ds\.json.*zero_optimization\.mystery"):
        fill_ds_config(bad, {})
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="ds.json"):
        fill_ds_config(bad, {})


def test_grad_accum_keeps_the_total_batch():
    assert grad_accum(TrainConfig(micro_batch=2, total_batch=4), world=1) == 2
    assert grad_accum(TrainConfig(micro_batch=2, total_batch=8), world=2) == 2
    with pytest.raises(ValueError, match="total-batch"):
        grad_accum(TrainConfig(micro_batch=2, total_batch=6), world=2)


def test_constant_report_is_the_most_frequent():
    assert constant_report(["a", "b", "b", "c"]) == "b"
    assert constant_report(["x", "y"]) == "x"  # ties: first seen
    with pytest.raises(ValueError):
        constant_report([])


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    state = checkpoint.rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    torch.save(state, tmp_path / "rng.pt")
    random.random(), np.random.rand(), torch.rand(())  # move all generators on
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_latest_tag_reports_a_pointer_to_a_missing_checkpoint(tmp_path):
    assert checkpoint.latest_tag(tmp_path) is None
    (tmp_path / checkpoint.POINTER).write_text("step00000004\n")
    with pytest.raises(FileNotFoundError, match="step00000004"):
        checkpoint.latest_tag(tmp_path)
    (tmp_path / "step00000004").mkdir()
    assert checkpoint.latest_tag(tmp_path) == "step00000004"


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    write_jsonl_atomic(path, [{"step": 1}])
    with open(path, "a") as f:
        f.write("{broken\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        read_jsonl(path)


def test_runlog_truncates_rows_after_the_resume_step(tmp_path):
    from hilt_scale.training.runlog import RunLog

    write_jsonl_atomic(
        tmp_path / "metrics.jsonl", [{"kind": "train", "step": s, "loss": 1.0} for s in (1, 2, 3, 4)]
    )
    log = RunLog(tmp_path, enabled=True, total_steps=4, start_step=2)
    log.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> str:
    from hilt_scale.training.data import build_default

    shards, _ = build_default(tmp_path_factory.mktemp("cache"), 20, (8, 16, 16), seed=1)
    return shards


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_deal_each_volume_once_with_equal_counts_per_rank(small_shards, world):
    from hilt_scale.training.data import split_reports
    from hilt_scale.training.loop import eval_inputs

    def eval_batches(path, split, limit, batch, rank, world):
        cfg = TrainConfig(eval_split=split, eval_limit=limit, eval_batch=batch)
        return eval_inputs(path, cfg, rank, world)

    per_rank = [list(eval_batches(small_shards, "valid", 3, 1, r, world)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # ZeRO-3 needs the same number of generate calls
    keys = [k for batches in per_rank for b in batches if b is not None for k in b["key"]]
    index = json.loads((Path(small_shards) / "index.json").read_text())
    valid = [k for s in index["shards"] if s["split"] == "valid" for k in s["keys"]]
    assert sorted(keys) == sorted(valid[:3])
    everything = [b for b in eval_batches(small_shards, "valid", 0, 2, 0, 1)]
    assert sum(len(b["key"]) for b in everything) == len(valid) == len(split_reports(small_shards, "valid"))
    assert everything[0]["hr"].shape[1:] == (1, 8, 16, 16) and everything[0]["hr"].dtype == torch.uint8


def test_split_reports_names_a_missing_index(tmp_path):
    from hilt_scale.training.data import split_reports

    with pytest.raises(FileNotFoundError, match="index.json"):
        split_reports(tmp_path, "train")


def test_on_error_flag_defaults_to_raise_and_accepts_skip():
    assert parse_args([]).on_error == "raise"
    assert parse_args(["--on-error", "skip"]).on_error == "skip"
    with pytest.raises(SystemExit):
        parse_args(["--on-error", "ignore"])


def test_batches_pass_over_a_batch_whose_samples_were_all_skipped():
    """Under --on-error skip a micro-batch of only bad samples is empty: it is not trained on."""
    from hilt_scale.training.loop import Batches, nonempty

    class Loader:
        epoch = 0

        def __iter__(self):
            collate = nonempty(lambda b: {**b, "collated": True})
            yield from (collate({"key": keys}) for keys in (["a"], [], ["b", "c"]))

    batches = Batches(Loader(), trace=True)
    assert [batches.next()["key"] for _ in range(3)] == [["a"], ["b", "c"], ["a"]]
    assert batches.seen == ["a", "b", "c", "a"]


def test_phantom_cache_entry_changes_with_the_generator_version(monkeypatch):
    from hilt_scale.training.data import cache_entry

    before = cache_entry(Path("/c"), 240, (32, 64, 64), 0)
    monkeypatch.setattr("shards.phantom.PHANTOM_VERSION", 99)
    after = cache_entry(Path("/c"), 240, (32, 64, 64), 0)
    assert before != after and "v99" in after.name


def test_exit_after_run_runs_the_exit_handlers_flushes_and_keeps_the_code():
    """train.py ends a finished run with os._exit (no interpreter teardown): what atexit holds
    (METEOR's JVM shutdown) must still run, and buffered output must not be lost."""
    import subprocess
    import sys

    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('handler ran', flush=True))\n"
        "from hilt_scale.training.distributed import exit_after_run\n"
        "print('buffered', end='')\n"
        "sys.stderr.write('err-buffered')\n"
        "exit_after_run(3)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "bufferedhandler ran\n" and proc.stderr.endswith("err-buffered")
