"""Export of a trained model: what ``generate`` needs, with no DeepSpeed and no checkpoint.

``save_export`` writes config.json, tokenizer/, vision.safetensors (ViT + connector), the peft
adapter and, for a random-init LLM, llm_base/; ``load_export`` rebuilds the model from it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from hilt_scale.model.config import from_dict, to_dict
from hilt_scale.model.mllm import HiltReportModel, build_model
from shards.io import write_bytes_atomic


def save_vision(model: HiltReportModel, path: str | os.PathLike) -> None:
    """Write ViT + connector weights as safetensors, atomically (temp file + os.replace)."""
    from safetensors.torch import save  # noqa: PLC0415

    state = {k: v.detach().contiguous().cpu() for k, v in model.vision_state_dict().items()}
    write_bytes_atomic(path, save(state))


def load_vision(model: HiltReportModel, path: str | os.PathLike) -> None:
    """Load ViT + connector weights written by ``save_vision``."""
    from safetensors.torch import load_file  # noqa: PLC0415

    model.load_vision_state_dict(load_file(os.fspath(path)))


def _base_llm_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of the LLM without LoRA / modules_to_save copies, under the plain transformers names."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    state = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        state[key] = value.detach().contiguous().cpu()
    return state


def save_export(model: HiltReportModel, out_dir: str | os.PathLike) -> Path:
    """Write what generation needs: config.json, tokenizer/, vision.safetensors, adapter/ (peft),
    and llm_base/ when the LLM was randomly initialised (it exists nowhere else).

    Needs full (gathered) parameters: under ZeRO-3 call it inside GatheredParameters on rank 0.
    The directory appears atomically (built beside it, then renamed).
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(to_dict(model.cfg), indent=2))
    model.tokenizer.save_pretrained(tmp / "tokenizer")
    save_vision(model, tmp / "vision.safetensors")
    if hasattr(model.llm, "peft_config"):
        model.llm.save_pretrained(tmp / "adapter")
    if model.cfg.llm.path is None:
        if model.cfg.llm.quantization != "none":
            raise ValueError("save_export: a random-init LLM with llm.quantization=nf4 cannot be exported")
        (tmp / "llm_base").mkdir()
        base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
        base.config.save_pretrained(tmp / "llm_base")
        save_file(
            _base_llm_state(model.llm), tmp / "llm_base" / "model.safetensors", metadata={"format": "pt"}
        )
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_export(export_dir: str | os.PathLike) -> HiltReportModel:
    """Rebuild a trained model from a ``save_export`` directory (on CPU; move it with ``.to``)."""
    from peft import set_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    src = Path(export_dir)
    config_path = src / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: not an export directory (no config.json)")
    cfg = from_dict(json.loads(config_path.read_text()))
    if (src / "llm_base").is_dir():
        cfg.llm.path = str(src / "llm_base")
    tokenizer = AutoTokenizer.from_pretrained(src / "tokenizer")
    model = build_model(cfg, tokenizer)
    adapter = src / "adapter" / "adapter_model.safetensors"
    if cfg.llm.lora:
        if not adapter.exists():
            raise FileNotFoundError(f"{adapter}: config has llm.lora=true but the adapter is missing")
        result = set_peft_model_state_dict(model.llm, load_file(adapter))
        if result.unexpected_keys:
            raise KeyError(f"{adapter}: unexpected adapter keys {result.unexpected_keys[:5]}")
    load_vision(model, src / "vision.safetensors")
    return model
