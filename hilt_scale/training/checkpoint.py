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
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hilt_scale.training.distributed import barrier
from shards.io import atomic_write, write_json_atomic, write_text_atomic

POINTER = "LATEST"
# Tests set this to a step number: the process SIGKILLs itself inside that step's save, after
# DeepSpeed wrote the new tag and before the pointer moved (the worst moment for a crash).
KILL_IN_SAVE_ENV = "HILT_SCALE_KILL_IN_SAVE"


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
    with atomic_write(tag_dir / f"trainer_rank{_rank()}.pt", "wb") as f:
        torch.save(trainer_state, f)
    if os.environ.get(KILL_IN_SAVE_ENV) == str(step):  # fault injection for the resume test
        os.kill(os.getpid(), signal.SIGKILL)
    barrier()
    if _rank() == 0:
        write_text_atomic(ckpt_dir / POINTER, tag + "\n")
        old = sorted(
            p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step") and p.name != tag
        )
        for path in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(path, ignore_errors=True)
    barrier()
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
    """Write the DeepSpeed-free export (``mllm.save_export``) plus the JSON ``files`` given.

    All ranks must call this: under ZeRO-3 the weights are gathered first (all of them when the
    LLM base is a random init that exists nowhere else, else only the trainable ones).
    """
    from hilt_scale.model.export import save_export

    model = engine.module
    whole = model.cfg.llm.path is None
    params = [p for p in model.parameters() if whole or p.requires_grad]
    with _gathered(engine, params):
        if _rank() == 0:
            save_export(model, out_dir)
            for name, obj in files.items():
                write_json_atomic(Path(out_dir) / name, obj)
    barrier()


def _gathered(engine: Any, params: list[torch.nn.Parameter]) -> Any:
    """Context that makes ZeRO-3 partitioned parameters whole on every rank (a no-op below stage 3)."""
    import contextlib

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()
