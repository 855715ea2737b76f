"""Named training recipes: functions that return a whole TrainConfig (torchtitan's config registry).

A recipe is the complete starting point of a run; variants call a base and change a few fields.
``--recipe NAME`` picks one, and command-line flags override its fields. ZeRO stage, offload and
precision are not here: they live only in the DeepSpeed JSON (``--ds``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from hilt_scale.training.config import TrainConfig


def phantom_cpu() -> TrainConfig:
    """The main job: phantom default, tiny conv-stem ViT + random-init tiny Llama, 2-core CPU (~12 min)."""
    # A random-init LLM on 192 training volumes needs a higher learning rate and many epochs
    # instead of the paper's 1e-4 / batch 4, which assume pretrained LLM weights.
    # The from-scratch encoder that sees one-voxel findings (vit-micro-conv, docs/MODEL.md) learns
    # from the auxiliary finding loss, the report loss stopping at its output: with the report
    # loss alone it wrote one report for every volume. Footprint keys keep a one-voxel finding in
    # its LR token (vision probe, 3 seeds), and the finding head's probabilities reach the LLM as
    # finding tokens, taught with the labels (docs/TRAINING.md, "The main job, measured"). A second
    # finding head on the HR tokens (encoder_findings_loss) teaches the ViT to lift a one-voxel
    # nodule into its token on every seed, not only on some (docs/SWEEPS.md, round 11).
    return TrainConfig(
        recipe="phantom-cpu",
        data=None,
        vision="vit-micro-conv",
        set=[
            "findings_loss=1.0",
            "encoder_findings_loss=1.0",
            "vision_lm_grad=false",
            "connector.keys=footprint",
            "finding_tokens=teacher",
        ],
        connector="hilt",
        llm="llm-tiny",
        resolution="cpu-tiny",
        lr=1e-3,
        epochs=30.0,
        # 480 steps of the vision path alone first (~2 min): on a seed whose encoder had not learned
        # small nodules in the 720 full steps (head AUC 0.56) it then did (0.97) and the report's
        # small-nodule F1 went from 0.19 to 0.71 (docs/TRAINING.md, "The main job, measured").
        vision_warmup_steps=480,
        micro_batch=4,
        total_batch=8,
        save_every=100,
        # Beam 3 as R2Gen / R2GenGPT evaluate: greedy decoding of this small model drifts to the
        # most frequent phrasing; on the same checkpoint beam 3 lifts the text average by ~5 points.
        num_beams=3,
    )


def ctrate_llama3_8b() -> TrainConfig:
    """The paper's main setting: CT-RATE at 512x512x256, ViT-Base, Llama-3-8B-Instruct + LoRA r128."""
    # Paper (Table 5 / A.4): AdamW lr 1e-4, linear schedule, warm-up 0.03, total batch 4, bf16
    # (the ds_config), LoRA r 128 / alpha 64 / dropout 0.1 (the llama3-8b preset), 512 tokens.
    return TrainConfig(
        recipe="ctrate-llama3-8b",
        data="ct-rate-shards",  # the shard set written by `python -m shards.write --ct-rate ...`
        out="runs/ctrate-llama3-8b",
        vision="vit-base",
        connector="hilt",
        llm="llama3-8b",
        resolution="paper",
        lr=1e-4,
        warmup_ratio=0.03,
        micro_batch=1,
        total_batch=4,
        epochs=3.0,
        save_every=500,
        eval_batch=2,
        num_beams=1,
    )


def ctrate_llama3_70b_qlora() -> TrainConfig:
    """The 8B recipe with Llama-3-70B-Instruct in 4-bit (QLoRA); run it with ds_configs/zero3_qlora.json."""
    return dataclasses.replace(
        ctrate_llama3_8b(), recipe="ctrate-llama3-70b-qlora", llm="llama3-70b", out="runs/ctrate-llama3-70b"
    )


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "phantom-cpu": phantom_cpu,
    "ctrate-llama3-8b": ctrate_llama3_8b,
    "ctrate-llama3-70b-qlora": ctrate_llama3_70b_qlora,
}


def recipe(name: str) -> TrainConfig:
    """A fresh TrainConfig of the named recipe; an unknown name lists the known ones."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[name]()
