"""--vision-warmup-steps: the vision path alone learns from the finding loss; the LLM is untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hilt_scale.recipes import recipe
from hilt_scale.training.data import build_default
from hilt_scale.training.loop import build_run_model, run_model_config
from hilt_scale.training.warmup import vision_modules, warm_up_vision

N, SIZE = 24, (16, 32, 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    return build_default(tmp_path_factory.mktemp("cache"), N, SIZE, seed=0)


def tiny_run(steps: int, findings_loss: float = 1.0):
    """The main job's recipe at the micro presets (conv stem, footprint keys, finding tokens)."""
    cfg = dataclasses.replace(
        recipe("phantom-cpu"), resolution="cpu-micro", llm="llm-micro", micro_batch=4, total_batch=8,
        lr=3e-3, vision_warmup_steps=steps,
    )  # fmt: skip
    cfg.set = [*cfg.set, f"findings_loss={findings_loss}"]
    return cfg


def test_warm_up_trains_the_vision_path_and_leaves_the_llm_alone(data):
    shards, tokenizer = data
    cfg = tiny_run(30)
    model = build_run_model(cfg, run_model_config(cfg), tokenizer)
    vision = {id(p) for m in vision_modules(model) for p in m.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = warm_up_vision(model, cfg, shards, rank=0, world=1, say=lambda _m: None)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    in_vision = {n for n, p in model.named_parameters() if id(p) in vision and p.requires_grad}
    assert changed == in_vision and any(n.startswith("finding_head.") for n in changed)
    assert any(n.startswith("encoder_head.") for n in changed)  # the recipe's encoder_findings_loss
    assert not any(n.startswith(("llm.", "finding_embed.")) for n in changed)
    assert log["steps"] == 30 and log["skipped"] == {}
    # The head learns the labels of the training volumes (loss of the last 3 steps vs the first 3).
    assert log["findings_loss_last"] < 0.9 * log["findings_loss_first"], log


def test_warm_up_needs_the_finding_loss(data):
    shards, tokenizer = data
    cfg = tiny_run(5, findings_loss=0.0)
    cfg.set = [*cfg.set, "finding_tokens=none", "vision_lm_grad=true", "encoder_findings_loss=0"]
    model = build_run_model(cfg, run_model_config(cfg), tokenizer)
    with pytest.raises(ValueError, match="findings_loss > 0"):
        warm_up_vision(model, cfg, shards, rank=0, world=1, say=lambda _m: None)
