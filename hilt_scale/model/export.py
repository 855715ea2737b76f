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


def read_tensors(
    path: str | os.PathLike, expected: dict[str, tuple[int, ...]] | None, what: str
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked strictly against ``expected`` (name -> shape; None:
    only readable and finite):
    every expected tensor present, no other, shapes equal, values finite. Otherwise a ValueError
    naming the file and the first missing / unexpected / misshapen / non-finite keys."""
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the export's {what} is missing")
    try:
        state = load_file(os.fspath(path))
    except Exception as exc:  # empty, truncated or not a safetensors file
        raise ValueError(f"{path}: the export's {what} is unreadable ({type(exc).__name__}: {exc})") from None
    problems = []
    expected = {k: tuple(v.shape) for k, v in state.items()} if expected is None else expected
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes),
                        ("non-finite values in", bad)):  # fmt: skip
        if keys:
            problems.append(f"{label} {len(keys)} tensor(s): {keys[:5]}")
    if problems:
        raise ValueError(f"{path}: the export's {what} does not fit the model: " + "; ".join(problems))
    return state


def load_export(export_dir: str | os.PathLike) -> HiltReportModel:
    """Rebuild a trained model from a ``save_export`` directory (on CPU; move it with ``.to``).

    Strict: the vision weights, the adapter and a random-init LLM base must each hold exactly the
    tensors the model expects, with its shapes and finite values (``read_tensors``); a broken or
    partial export is an error naming the file and the first bad keys, never a model that writes
    empty or gibberish reports.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    src = Path(export_dir)
    config_path = src / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: not an export directory (no config.json)")
    cfg = from_dict(json.loads(config_path.read_text()))
    # Training-only options: where the report loss stops means nothing at inference, and the
    # finding head is exported only when its finding tokens feed the LLM (finding_tokens).
    cfg.vision_lm_grad = True
    cfg.encoder_findings_loss = 0.0
    if cfg.finding_tokens == "none":
        cfg.findings_loss = 0.0
    base_file = src / "llm_base" / "model.safetensors"
    if (src / "llm_base").is_dir():
        cfg.llm.path = str(src / "llm_base")
        read_tensors(base_file, None, "LLM base")  # readable and finite before transformers opens it
    tokenizer = AutoTokenizer.from_pretrained(src / "tokenizer")
    model = build_model(cfg, tokenizer)
    if (src / "llm_base").is_dir():  # from_pretrained fills missing weights randomly: check the file
        shapes = {k: tuple(v.shape) for k, v in _base_llm_state(model.llm).items()}
        read_tensors(base_file, shapes, "LLM base")
    if cfg.llm.lora:
        adapter = src / "adapter" / "adapter_model.safetensors"
        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model.llm).items()}
        result = set_peft_model_state_dict(model.llm, read_tensors(adapter, expected, "LoRA adapter"))
        if result.unexpected_keys:
            raise KeyError(f"{adapter}: unexpected adapter keys {result.unexpected_keys[:5]}")
    vision = {k: tuple(v.shape) for k, v in model.vision_state_dict().items()}
    model.load_vision_state_dict(read_tensors(src / "vision.safetensors", vision, "vision weights"))
    return model
