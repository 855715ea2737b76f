"""Crash-safe DeepSpeed checkpoints with exact-resume state, and the DeepSpeed-free export.

A checkpoint is a DeepSpeed tag directory ``checkpoints/stepNNNNNNNN`` plus one small
``trainer_rank{r}.pt`` per rank (RNG states and loader position, which differ per rank). Our own
pointer file ``checkpoints/LATEST`` is replaced atomically only after every rank has finished
writing, so a kill in the middle of a save leaves the previous checkpoint the one that resumes.
DeepSpeed's own ``latest`` file is never written.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

POINTER = "LATEST"


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by ``rng_state``."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    """random.setstate needs tuples where a round trip through torch.save may give lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def tag_for(step: int) -> str:
    """Checkpoint tag of an optimizer step; zero-padded so tags sort by step."""
    return f"step{step:08d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag our pointer names, or None when no complete checkpoint exists."""
    pointer = Path(ckpt_dir) / POINTER
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names checkpoint {tag!r}, which is missing from {ckpt_dir}")
    return tag


def save(
    engine: Any,
    ckpt_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> str:
    """Save a DeepSpeed checkpoint under a new tag, then move the pointer to it; keep the last ``keep``."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    # Frozen base weights come from the model build (pretrained path or seeded init), not the checkpoint.
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
    )
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    target = tag_dir / f"trainer_rank{_rank()}.pt"
    tmp = target.with_suffix(".pt.tmp")
    torch.save(trainer_state, tmp)
    os.replace(tmp, target)
    _barrier()
    if _rank() == 0:
        fd, tmp_name = tempfile.mkstemp(dir=ckpt_dir, prefix=".LATEST.")
        with os.fdopen(fd, "w") as f:
            f.write(tag + "\n")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, ckpt_dir / POINTER)
        old = sorted(
            p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step") and p.name != tag
        )
        for path in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(path, ignore_errors=True)
    _barrier()
    return tag


def load(engine: Any, ckpt_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Load the pointer's checkpoint into ``engine``; return (client_state, this rank's trainer state)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r} from {ckpt_dir}")
    own = Path(ckpt_dir) / tag / f"trainer_rank{_rank()}.pt"
    if not own.exists():
        raise FileNotFoundError(
            f"{own} is missing: the checkpoint was written by fewer ranks than this run has; "
            "resume with the same number of processes"
        )
    trainer_state = torch.load(own, map_location="cpu", weights_only=True)
    return client_state, trainer_state


def export(engine: Any, out_dir: str | Path, files: dict[str, Any]) -> None:
    """Write the DeepSpeed-free export: peft adapter, vision.safetensors, tokenizer, JSON files.

    All ranks must call this (ZeRO-3 gathers the trainable weights); rank 0 writes into a temp
    directory that replaces ``out_dir`` in one rename. ``files`` maps file names to JSON objects.
    """
    from hilt_scale.mllm import save_vision
    from hilt_scale.runlog import write_json_atomic

    model = engine.module
    params = [p for p in model.parameters() if p.requires_grad]
    gather = _gathered(engine, params)
    with gather:
        if _rank() == 0:
            out_dir = Path(out_dir)
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
            tmp.chmod(0o755)  # mkdtemp makes 0700 directories
            model.llm.save_pretrained(str(tmp / "adapter"))
            save_vision(model, tmp / "vision.safetensors")
            model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            for name, obj in files.items():
                write_json_atomic(tmp / name, obj)
            old = out_dir.with_name(f".{out_dir.name}.old")
            if out_dir.exists():
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
    _barrier()


def _gathered(engine: Any, params: list[torch.nn.Parameter]) -> Any:
    """Context that makes ZeRO-3 partitioned parameters whole on every rank (a no-op below stage 3)."""
    import contextlib

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()
