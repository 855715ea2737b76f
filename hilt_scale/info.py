"""Token and parameter counts of a model configuration, built on the meta device (no weights).

    python -m hilt_scale.info --vision vit-base --connector hilt \
        --hr-size 256,512,512 --lr-size 64,128,128 --llm llama3-8b

    python -m hilt_scale.info --versions     # the resolved versions of the packages we build on

Prints a table, then one JSON line with ``hr_tokens``, ``lr_tokens``, ``visual_tokens`` and
parameter counts. The vision encoder and connector really run (on meta tensors), so the token
counts are the model's own, not a formula.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from typing import Any

import torch

from hilt_scale.model.config import CONNECTOR_KINDS, ModelConfig, apply_overrides, model_config
from hilt_scale.model.connectors import build_connector
from hilt_scale.model.mllm import add_lora, hf_config
from hilt_scale.model.visual import build_vision, vision_features
from shards.schema import parse_size

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# The packages whose versions change results or break us; CI prints them, summary.json records them.
VERSIONED = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "triton", "webdataset", "kernels")


def package_versions() -> dict[str, str | None]:
    """Installed version of each package in ``VERSIONED`` (None where it is not installed)."""
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _meta_llm(cfg: ModelConfig) -> torch.nn.Module:
    """The LLM (with LoRA when configured) on the meta device: shapes only, nothing loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    llm_cfg = cfg.llm
    from_preset = llm_cfg.path is None or llm_cfg.name != llm_cfg.path
    config = hf_config(llm_cfg) if from_preset else AutoConfig.from_pretrained(llm_cfg.path)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
        llm = add_lora(llm, llm_cfg)
    return llm


def _count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _frozen_weight_bytes(llm: torch.nn.Module, cfg: ModelConfig) -> float:
    """Bytes of the frozen LLM weights: nf4 packs Linear weights (not lm_head) at half a byte each."""
    nbytes = float(_BYTES[cfg.llm.dtype])
    quantized = 0
    if cfg.llm.quantization == "nf4":
        for name, module in llm.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name and "lora_" not in name:
                quantized += module.weight.numel()
    frozen = sum(p.numel() for p in llm.parameters() if not p.requires_grad)
    return (frozen - quantized) * nbytes + quantized * 0.5


def inspect_model(cfg: ModelConfig, with_llm: bool = True) -> dict[str, Any]:
    """Token counts and parameter counts of ``cfg`` without allocating any weights."""
    res = cfg.resolution
    with torch.device("meta"):
        vision = build_vision(cfg)
        connector = build_connector(cfg.connector, cfg.vision.width, cfg.llm.hidden_size)
        # HU input (int16) suits every vision.input, the calcium channel's included
        hr = torch.empty(1, 1, *res.hr_size, dtype=torch.int16)
        z_hr, z_lr, hr_grid = vision_features(vision, connector, hr, res.lr_size, res.lr_view)
        visual = connector(z_hr, z_lr, hr_grid)
    n_hr = z_hr.shape[1] if z_hr is not None else 0
    n_lr = z_lr.shape[1] if z_lr is not None else 0
    vision_params = _count(vision) + _count(connector)
    out: dict[str, Any] = {
        "vision": cfg.vision.name,
        "connector": cfg.connector.kind,
        "hr_size": list(res.hr_size),
        "lr_size": list(res.lr_size),
        "patch_size": list(vision.patch_size),
        "hr_tokens": n_hr,
        "lr_tokens": n_lr,
        "visual_tokens": visual.shape[1],
        "vision_params": _count(vision),
        "connector_params": _count(connector),
    }
    if with_llm:
        llm = _meta_llm(cfg)
        llm_total = _count(llm)
        llm_trainable = _count(llm, trainable_only=True)
        out.update(
            llm=cfg.llm.name,
            llm_params=llm_total - llm_trainable,
            llm_trainable_params=llm_trainable,
            llm_weight_gib=round(_frozen_weight_bytes(llm, cfg) / 2**30, 2),
            trainable_params=vision_params + llm_trainable,
            total_params=vision_params + llm_total,
        )
    else:
        out.update(trainable_params=vision_params, total_params=vision_params)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: print a table and a JSON line for the requested configuration."""
    p = argparse.ArgumentParser(prog="python -m hilt_scale.info", description=__doc__.split("\n")[0])
    p.add_argument("--vision", default="vit-base")
    p.add_argument("--connector", default="hilt", choices=CONNECTOR_KINDS)
    p.add_argument("--llm", default="llama3-8b", help="LLM preset or local directory; 'none' skips the LLM")
    p.add_argument("--resolution", default="paper", help="resolution preset the sizes below override")
    p.add_argument("--hr-size", type=parse_size, help="D,H,W of the HR volume, e.g. 256,512,512")
    p.add_argument("--lr-size", type=parse_size, help="D,H,W of the LR view, e.g. 64,128,128")
    p.add_argument("--patch-size", type=parse_size, help="D,H,W of a ViT patch, e.g. 16,32,32")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE", help="config overrides")
    p.add_argument("--versions", action="store_true", help="print the installed versions of our key packages")
    args = p.parse_args(argv)
    if args.versions:
        versions = package_versions()
        print("  ".join(f"{k} {v or '-'}" for k, v in versions.items()))
        print(json.dumps(versions))
        return versions
    with_llm = args.llm.lower() != "none"
    cfg = model_config(args.vision, args.connector, args.llm if with_llm else "llm-tiny", args.resolution)
    sizes = {"hr_size": args.hr_size, "lr_size": args.lr_size, "patch_size": args.patch_size}
    overrides: dict[str, Any] = {f"resolution.{k}": v for k, v in sizes.items() if v is not None}
    cfg = apply_overrides(cfg, overrides)
    cfg = apply_overrides(cfg, list(args.set))
    info = inspect_model(cfg, with_llm=with_llm)
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = f"{value:,}" if isinstance(value, int) else value
        print(f"{key:<{width}}  {shown}")
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
