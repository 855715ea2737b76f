"""Checkpoints, issue 23: only finite weights are saved (LATEST stays resumable), --resume-tag picks
a tag by name, and resume refuses a changed schedule by name unless --allow-change KEY."""

import pytest
import torch
from test_checkpoint_reliability import IDENTITY, FakeEngine, save_step

from hilt_scale.training import checkpoint
from hilt_scale.training.config import parse_args


def quiet(_msg: str) -> None:
    pass


def test_non_finite_weights_are_never_saved_and_latest_stays_at_the_last_finite_tag(tmp_path):
    """Minor case: `--lr 1e30` left LATEST holding weights resume could only fail on."""
    engine = FakeEngine()
    save_step(engine, tmp_path, 2)
    engine.module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        engine.module.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError) as err:
        save_step(engine, tmp_path, 3)
    assert "step 3" in str(err.value) and "weight" in str(err.value) and "step00000002" in str(err.value)
    assert checkpoint.pointer_tag(tmp_path) == "step00000002" and checkpoint.tags(tmp_path) == [
        "step00000002"
    ]


def test_resume_tag_picks_an_older_tag_by_name(tmp_path):
    engine = FakeEngine()
    for step in (2, 4):
        save_step(engine, tmp_path, step)
    client, _ = checkpoint.load(FakeEngine(), tmp_path, IDENTITY, quiet, tag="step00000002")
    assert client["step"] == 2
    with pytest.raises(checkpoint.CheckpointError, match="step00000009"):
        checkpoint.load(FakeEngine(), tmp_path, IDENTITY, quiet, tag="step00000009")
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint tag"):
        checkpoint.load(FakeEngine(), tmp_path, IDENTITY, quiet, tag="../x")


def test_resume_refuses_a_changed_schedule_by_name_unless_allowed(tmp_path):
    """Minor case: resume accepted a changed lr / warm-up / max-steps silently."""
    saved = {**IDENTITY, "config": {"phantom_n": 24, "lr": 1e-4, "max_steps": 4, "warmup_ratio": 0.03}}
    engine = FakeEngine()
    engine.weight = torch.full((256,), 2.0)
    checkpoint.save(engine, tmp_path, 2, {"step": 2}, {"step": 2}, identity=saved)
    now = {**saved, "config": {**saved["config"], "lr": 1e-3, "max_steps": 8}}
    with pytest.raises(ValueError) as err:
        checkpoint.load(FakeEngine(), tmp_path, now, quiet)
    assert "config.lr: 0.0001 -> 0.001" in str(err.value) and "config.max_steps: 4 -> 8" in str(err.value)
    assert "--allow-change" in str(err.value)
    client, _ = checkpoint.load(FakeEngine(), tmp_path, now, quiet, allow=("lr", "max_steps"))
    assert client["step"] == 2
    # A field an older checkpoint did not record is not a change (IDENTITY has no lr).
    save_step(FakeEngine(), tmp_path / "old", 2)
    assert checkpoint.load(
        FakeEngine(), tmp_path / "old", {**IDENTITY, "config": {"phantom_n": 24, "lr": 1.0}}, quiet
    )


def test_the_flags_parse():
    cfg = parse_args(["--allow-change", "lr", "--allow-change", "max_steps", "--resume-tag", "step00000002"])
    assert cfg.allow_change == ["lr", "max_steps"] and cfg.resume_tag == "step00000002"
    assert {"lr", "warmup_ratio", "max_steps", "epochs"} <= set(checkpoint.RESUME_FIELDS)
