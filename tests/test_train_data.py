"""Issue 12 on the trainer's data path: HR size check, the eval split, generation length from the
data with counted truncation, and own shards with a small preset LLM (tokenizer trained from them)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from hilt_scale.model.config import model_config
from hilt_scale.model.mllm import ReportCollator, build_tokenizer
from hilt_scale.training.config import TrainConfig, parse_args
from hilt_scale.training.data import (
    build_default,
    check_hr_size,
    eval_splits,
    length_plan,
    percentile_nearest_rank,
    prepare_data,
    split_reports,
)

SIZE = (16, 32, 32)  # the cpu-micro preset's HR size


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    path, _ = build_default(tmp_path_factory.mktemp("cache"), 16, SIZE, seed=3)
    return path


def test_building_the_phantom_in_process_keeps_the_trainers_thread_count(tmp_path):
    """The trainer builds its phantom in its own process (one shard writer), then trains: the
    writer's one-thread resampling must not leave training on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_default(tmp_path / "cache", 4, SIZE, seed=5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_encoder_that_reads_hu_above_the_window_gets_int16_phantom_shards(tmp_path):
    """The calcium channel needs HU: without --data the trainer writes its phantom as int16 shards,
    in a cache entry of its own, and the HU above the paper's window reach the batch; the paper's
    encoder keeps the uint8 phantom."""
    from hilt_scale.training.loop import run_model_config
    from shards.read import open_shard_set

    def data_of(*sets: str) -> str:
        args = ["--resolution", "cpu-micro", "--vision", "vit-micro-conv"]
        cfg = dataclasses.replace(
            parse_args([*args, *(x for s in sets for x in ("--set", s))]),
            cache=str(tmp_path / "cache"),
            phantom_n=8,
        )
        return prepare_data(cfg, run_model_config(cfg), rank=0, local_rank=0)[0]

    hu = open_shard_set(data_of("vision.input=window+contrast+calcium"))
    paper = open_shard_set(data_of())
    assert hu.dtype == "int16" and paper.dtype == "uint8" and hu.root != paper.root
    top = max(int(hu.read(i, j)["hr"].max()) for s in ("train", "valid") for i, j in hu.entries(s))
    assert top > 200, top  # above the paper's window: bone or calcium kept in HU
    assert open_shard_set(data_of("vision.hu_window=-1000,1000")).root == hu.root


def _index_only(tmp_path: Path, splits: dict[str, int], hr_size=SIZE) -> str:
    """A shard set's index.json alone (what the split and size checks read)."""
    shards = [{"name": f"{s}-000000.tar", "split": s, "count": n, "keys": []} for s, n in splits.items()]
    index = {"version": 1, "shards": shards, "splits": splits, "hr_size": list(hr_size), "dtype": "uint8"}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "index.json").write_text(json.dumps(index))
    return str(tmp_path)


def test_eval_split_defaults_to_test_when_the_shard_set_has_one(tmp_path):
    assert TrainConfig().eval_split == "auto" and parse_args([]).eval_split == "auto"
    ctrate = _index_only(tmp_path / "a", {"train": 7, "valid": 1, "test": 2})
    assert eval_splits(ctrate, "auto") == ("test", "valid")  # final on test, model selection on valid
    phantom = _index_only(tmp_path / "b", {"train": 7, "valid": 1})
    assert eval_splits(phantom, "auto") == ("valid", "valid")
    assert eval_splits(ctrate, "valid") == ("valid", "valid")  # an explicit split is kept
    no_valid = _index_only(tmp_path / "c", {"train": 7, "test": 2})
    assert eval_splits(no_valid, "auto") == ("test", "test")


def test_shards_at_another_hr_size_are_refused_naming_both(tmp_path, shards):
    mcfg = model_config("vit-micro", "hilt", "llm-micro", "cpu-micro")
    check_hr_size(mcfg, shards, shards)  # the phantom was written at the model's size
    other = _index_only(tmp_path / "big", {"train": 1}, hr_size=(32, 64, 64))
    with pytest.raises(ValueError) as err:
        check_hr_size(mcfg, shards, other)
    assert str(other) in str(err.value)
    assert "(32, 64, 64)" in str(err.value) and "resolution.hr_size is (16, 32, 32)" in str(err.value)


def test_percentile_is_nearest_rank():
    assert percentile_nearest_rank(list(range(1, 101)), 99) == 99
    assert percentile_nearest_rank([5, 1, 3], 99) == 5
    assert percentile_nearest_rank([7], 50) == 7


def _collator(reports: list[str], max_length: int, visual: int = 8) -> ReportCollator:
    tok = build_tokenizer(model_config(llm="llm-micro"), texts=reports * 4)
    return ReportCollator(tok, "<image>\nReport:", max_length, visual_tokens=visual)


def test_generation_length_covers_the_99th_percentile_of_training_reports():
    reports = [" ".join(["lung"] * n) for n in range(1, 101)]  # 1..100 words, one token each
    col = _collator(reports, max_length=512)
    assert col.report_length(reports[41]) == 43  # 42 tokens + eos
    plan = length_plan(reports, col, None)
    assert plan["report_tokens_p99"] == 100 and plan["max_new_tokens"] == 100  # p99 of 2..101
    assert plan["truncated"] == 0 and plan["warnings"] == [] and plan["max_new_tokens_from"] == "data (p99)"
    assert length_plan(reports, col, 20)["max_new_tokens"] == 20  # a given value is kept


def test_reports_over_the_sequence_budget_are_counted_and_warned_never_silent():
    reports = [" ".join(["lung"] * n) for n in range(1, 101)]
    col = _collator(reports, max_length=64)
    budget = col.report_budget
    assert budget == 64 - 8 - len(col.pre) - len(col.post)
    plan = length_plan(reports, col, None)
    over = sum(n + 1 > budget for n in range(1, 101))
    assert plan["truncated"] == over > 0 and plan["max_new_tokens"] == budget
    assert f"{over} of 100 training reports" in plan["warnings"][0] and "max_length" in plan["warnings"][0]
    with pytest.raises(ValueError, match="--max-new-tokens 500 does not fit the sequence budget"):
        length_plan(reports, col, 500)
    # The collator cuts the same reports and counts them, per batch and in total.
    batch = col({"report": reports[-3:] + reports[:1], "key": list("abcd"), "hr": torch.zeros(4, 1, 1, 1, 1)})
    assert batch["n_truncated"] == 3 and col.truncated == 3 and col.seen == 4
    assert batch["input_ids"].shape[1] == 64 - 8 + 1  # the image slot is one sentinel entry


def test_own_shards_with_llm_micro_train_their_tokenizer_and_build(tmp_path, shards):
    """`train.py --data SHARDS --llm llm-micro` used to fail ("has no path or tokenizer_path")."""
    from hilt_scale.training.loop import build_run_model, run_model_config
    from shards.read import ShardLoader

    cfg = dataclasses.replace(
        parse_args(["--data", shards, "--llm", "llm-micro", "--resolution", "cpu-micro"]),
        out=str(tmp_path / "run"),
    )
    mcfg = run_model_config(cfg)
    data, tokenizer_dir = prepare_data(cfg, mcfg, rank=0, local_rank=0)
    assert data == shards and tokenizer_dir == str(tmp_path / "run" / "tokenizer")
    model = build_run_model(cfg, mcfg, tokenizer_dir)
    train = split_reports(shards, "train")
    # The tokenizer was trained on the shard set's own training reports: they encode without <unk>.
    ids = model.tokenizer(train[0], add_special_tokens=False)["input_ids"]
    assert model.tokenizer.unk_token_id not in ids and model.tokenizer.decode(ids).split() == train[0].split()
    batch = next(
        iter(ShardLoader(shards, split="train", batch_size=2, shuffle=False, collate_fn=model.collator()))
    )
    loss = model(batch)
    assert torch.isfinite(loss) and loss.item() > 0


@pytest.mark.slow
def test_a_run_evaluates_on_test_selects_on_valid_and_counts_truncation(tmp_path, shards):
    """End to end (one process, ~1 min): own shards with a test split and llm-micro; a budget too
    small for some reports: summary.json records the split and the counted truncation."""
    import os
    import shutil
    import subprocess
    import sys

    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    index = json.loads((data / "index.json").read_text())
    train_shards = [s for s in index["shards"] if s["split"] == "train"]
    train_shards[-1]["split"] = "test"  # a patient split: train / valid / test
    (data / "index.json").write_text(json.dumps(index))
    test_keys = train_shards[-1]["keys"]
    out = tmp_path / "run"
    root = Path(__file__).parents[1]
    flags = ["--data", str(data), "--llm", "llm-micro", "--resolution", "cpu-micro", "--out", str(out)]
    flags += ["--max-steps", "2", "--micro-batch", "2", "--total-batch", "2", "--eval-every", "1"]
    flags += ["--eval-limit", "2", "--eval-batch", "2", "--set", "max_length=120", "--no-export"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "hilt_scale/train.py", "--ds", "ds_configs/zero2.json", *flags]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "test" and summary["select_split"] == "valid"
    predicted = [json.loads(line)["key"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(predicted) == sorted(test_keys[:2])
    lengths = summary["report_lengths"]
    assert lengths["train_reports"] == 8 and 0 < lengths["truncated"] <= 8
    assert lengths["max_new_tokens"] == lengths["report_budget"] < lengths["report_tokens_p99"]
    assert f"{lengths['truncated']} of 8 training reports" in proc.stdout
    assert json.loads((out / "train_config.json").read_text())["max_new_tokens"] == lengths["max_new_tokens"]
