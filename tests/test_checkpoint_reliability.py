"""Checkpoint guarantees without a process group: a fake engine writes through the real save/load.

The fake engine stands in for DeepSpeed's: it writes and reads its files through
``engine.checkpoint_engine`` exactly as ``DeepSpeedEngine.save_checkpoint`` / ``load_checkpoint``
do, so the atomic writes, manifests, fallback, identity checks and safe loading are the real ones.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from hilt_scale.training import checkpoint
from hilt_scale.training.checkpoint import CheckpointError


class _PlainEngine:
    """DeepSpeed's default behaviour: torch.save to a path, torch.load(weights_only=False)."""

    def save(self, state_dict, path):
        torch.save(state_dict, path)

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)


class FakeEngine:
    """Two files per tag, like ZeRO: model states and optimizer states (step-dependent tensors)."""

    def __init__(self, weight: float = 0.0):
        self.weight = torch.full((256,), weight)
        self.checkpoint_engine = _PlainEngine()
        self._config = None

    def zero_optimization_stage(self) -> int:
        return 2

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save(
            {"module": self.weight, **client_state}, str(d / "mp_rank_00_model_states.pt")
        )
        self.checkpoint_engine.save({"exp_avg": self.weight * 2}, str(d / "zero_pp_rank_0_optim_states.pt"))

    def load_checkpoint(self, load_dir, tag, load_module_strict):
        d = Path(load_dir) / tag
        sd = self.checkpoint_engine.load(str(d / "mp_rank_00_model_states.pt"), map_location="cpu")
        self.checkpoint_engine.load(str(d / "zero_pp_rank_0_optim_states.pt"), map_location="cpu")
        self.weight = sd.pop("module")
        return str(d), sd


IDENTITY = {"world_size": 1, "zero_stage": 2, "model": {"vision": {"depth": 2}}, "config": {"phantom_n": 24}}


def save_step(engine: FakeEngine, ckpt: Path, step: int, keep: int = 2) -> str:
    engine.weight = torch.full((256,), float(step))
    return checkpoint.save(engine, ckpt, step, {"step": step}, {"step": step}, keep=keep, identity=IDENTITY)


def snapshot(tag_dir: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(tag_dir.iterdir())
    }


def test_a_save_at_the_pointers_step_never_writes_into_that_tag(tmp_path):
    """Case 2: resaving the step LATEST names goes to a fresh tag; the old one is intact until LATEST moved."""
    engine = FakeEngine()
    first = save_step(engine, tmp_path, 4, keep=1)
    before = snapshot(tmp_path / first)
    second = save_step(engine, tmp_path, 4, keep=1)
    assert second != first and checkpoint.tag_key(second) == (4, 1)
    assert (tmp_path / "LATEST").read_text().strip() == second
    checkpoint.verify(tmp_path / second)
    # keep=1: the old tag was deleted only after the new one was complete and the pointer moved;
    # it was never rewritten in place (a kill mid-rewrite would have left nothing usable).
    assert not (tmp_path / first).exists()
    assert before  # it had been complete


def test_resume_verifies_and_falls_back_to_the_newest_intact_tag(tmp_path):
    """Case 2 / 8: a truncated file in LATEST's tag is named, and the older intact tag resumes."""
    engine = FakeEngine()
    save_step(engine, tmp_path, 2)
    save_step(engine, tmp_path, 4)
    bad = tmp_path / "step00000004" / "zero_pp_rank_0_optim_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    messages: list[str] = []
    client, trainer = checkpoint.load(FakeEngine(), tmp_path, IDENTITY, log=messages.append)
    assert client["step"] == 2 and trainer == {"step": 2}
    text = "\n".join(messages)
    assert str(bad) in text and "truncated" in text and "step00000002" in text


def test_missing_file_is_named_and_no_intact_tag_is_an_error(tmp_path):
    engine = FakeEngine()
    save_step(engine, tmp_path, 2, keep=1)
    gone = tmp_path / "step00000002" / "mp_rank_00_model_states.pt"
    gone.unlink()
    with pytest.raises(CheckpointError, match=str(gone)):
        checkpoint.load(FakeEngine(), tmp_path, IDENTITY, log=lambda _m: None)


def test_an_unfinished_save_is_never_resumed_and_is_replaced(tmp_path):
    """A tag without a manifest (killed save, newer than LATEST) is ignored, then rewritten cleanly."""
    engine = FakeEngine()
    save_step(engine, tmp_path, 2)
    dead = tmp_path / "step00000004"
    dead.mkdir()
    (dead / "mp_rank_00_model_states.pt").write_bytes(b"half")
    (dead / "trainer_rank7.pt").write_bytes(b"stale")
    client, _ = checkpoint.load(FakeEngine(), tmp_path, IDENTITY, log=lambda _m: None)
    assert client["step"] == 2
    assert save_step(engine, tmp_path, 4) == "step00000004"
    assert not (dead / "trainer_rank7.pt").exists()  # the leftover was removed before writing
    assert set(checkpoint.verify(dead)["files"]) == {
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_optim_states.pt",
        "trainer_rank0.pt",
    }


def test_resume_refuses_a_changed_run_naming_what_changed(tmp_path):
    """Case 8: model config, data and world size are compared before DeepSpeed reads anything."""
    save_step(FakeEngine(), tmp_path, 2)
    now = {**IDENTITY, "world_size": 2, "model": {"vision": {"depth": 3}}, "config": {"phantom_n": 20}}

    class Untouchable(FakeEngine):
        def load_checkpoint(self, *a, **k):
            raise AssertionError("DeepSpeed must not be reached")

    with pytest.raises(ValueError) as err:
        checkpoint.load(Untouchable(), tmp_path, now, log=lambda _m: None)
    msg = str(err.value)
    assert "model.vision.depth: 2 -> 3" in msg and "world_size: 1 -> 2" in msg
    assert "config.phantom_n: 24 -> 20" in msg and "step00000002" in msg


def test_shard_set_digest_follows_content_not_the_index_summary(tmp_path):
    index = {
        "version": 2,
        "shards": [{"name": "train-000000.tar", "sha256": "ab", "count": 8}],
        "summary": {},
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    a = checkpoint.shard_set_digest(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({**index, "summary": {"errors": ["x"]}}))
    assert checkpoint.shard_set_digest(tmp_path) == a
    index["shards"][0]["count"] = 7
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert checkpoint.shard_set_digest(tmp_path) != a


def test_full_disk_names_the_checkpoint_path_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """Case 11: ENOSPC while writing a tag: the error names the file; LATEST still loads."""
    engine = FakeEngine()
    save_step(engine, tmp_path, 2)
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError) as err:
        save_step(engine, tmp_path, 4)
    monkeypatch.setattr(os, "fsync", real_fsync)
    msg = str(err.value)
    assert str(tmp_path / "step00000004") in msg and "No space left" in msg
    assert (tmp_path / "LATEST").read_text().strip() == "step00000002"
    assert not (tmp_path / "step00000004").exists()  # the partial tag is gone, the previous intact
    client, _ = checkpoint.load(FakeEngine(), tmp_path, IDENTITY, log=lambda _m: None)
    assert client["step"] == 2


class Payload:
    """Unpickling this creates a marker file (what a planted checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_payload_is_refused_unrun_and_named(tmp_path):
    """Case 5: DeepSpeed's loads go through safe_load, which never unpickles code."""
    engine = FakeEngine()
    save_step(engine, tmp_path, 2)
    planted = tmp_path / "step00000002" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, planted)
    # An attacker who can write the files can rewrite the manifest too: it is no signature.
    checkpoint.write_manifest(planted.parent, 2, IDENTITY)
    with pytest.raises(CheckpointError, match=str(planted)):
        checkpoint.load(FakeEngine(), tmp_path, IDENTITY, log=lambda _m: None)
    assert not marker.exists()


def test_deepspeed_types_are_allow_listed():
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    names = {c.__name__ for c in checkpoint.allowed_globals()}
    assert names == {"LossScaler", "ZeroStageEnum", "fragment_address"}
    assert LossScaler in checkpoint.allowed_globals()


def test_a_first_save_cut_short_means_a_fresh_start(tmp_path):
    """Killed inside the very first save (no LATEST yet): --resume starts from step 0, saying why."""
    dead = tmp_path / "step00000001"
    dead.mkdir()
    (dead / "mp_rank_00_model_states.pt").write_bytes(b"half")
    messages: list[str] = []
    assert checkpoint.load(FakeEngine(), tmp_path, IDENTITY, log=messages.append) is None
    assert "unfinished save" in messages[0]
    # With a pointer, the tag it names must be intact: a missing manifest there is damage.
    save_step(FakeEngine(), tmp_path, 2, keep=1)
    (tmp_path / "step00000002" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        checkpoint.load(FakeEngine(), tmp_path, IDENTITY, log=lambda _m: None)
