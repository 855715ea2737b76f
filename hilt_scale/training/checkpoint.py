"""Crash-safe, verified DeepSpeed checkpoints with exact-resume state, and the DeepSpeed-free export.

A checkpoint is a DeepSpeed tag directory ``checkpoints/stepNNNNNNNN`` plus one small
``trainer_rank{r}.pt`` per rank (RNG states, loader position and skip counts, which differ per
rank) and ``manifest.json`` (size and sha256 of every file of the tag, plus the run's identity:
model config, data set, ZeRO stage, world size), written last and atomically. Our own pointer
file ``checkpoints/LATEST`` is replaced atomically only after the manifest, so a kill at any
moment leaves the previous checkpoint the one that resumes. DeepSpeed's own ``latest`` is never
written.

Guarantees:
- A save never writes into, and never deletes, the tag ``LATEST`` names: a save at the step of
  that tag goes to a fresh name (``stepNNNNNNNN-1``), and older tags are pruned only after the
  pointer moved to the new, complete one.
- Every file DeepSpeed writes goes through ``shards.io.atomic_write`` (``SafeCheckpointEngine``),
  and every failure of a save (a full disk, ...) is raised as ``CheckpointError`` naming the path.
- Resume verifies the tag against its manifest (missing, truncated or altered files, by path) and
  falls back to the newest older intact tag, saying so; a changed model, data set, ZeRO stage or
  world size is refused by name before DeepSpeed sees the files.
- Nothing is unpickled with ``weights_only=False``: DeepSpeed's loads go through ``safe_load``
  (``torch.load(weights_only=True)`` with only the DeepSpeed types its state needs allow-listed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hilt_scale.training.distributed import barrier, first_error
from shards.io import atomic_write, write_json_atomic, write_text_atomic

POINTER = "LATEST"
MANIFEST = "manifest.json"
# Fault injection for the resume tests: "STEP" or "STEP:PHASE". The process SIGKILLs itself in
# that step's save at PHASE: "write" (after DeepSpeed's first file, mid-tag), "trainer" (the
# default: every rank wrote, before the manifest), "manifest" (manifest written, pointer not
# moved), "pointer" (pointer moved, old tags not yet pruned).
KILL_IN_SAVE_ENV = "HILT_SCALE_KILL_IN_SAVE"
# Config fields that must match between the checkpoint's run and a resuming one.
# The schedule (lr, warm-up, steps, epochs) too: a resumed run that silently changed it would not
# be the run it continues; ``--allow-change KEY`` accepts one on purpose (recorded in train_config.json).
RESUME_FIELDS = (
    "micro_batch", "total_batch", "seed", "data", "phantom_n", "phantom_size",
    "lr", "warmup_ratio", "max_steps", "epochs", "vision_warmup_steps",
)  # fmt: skip
_TAG_RE = re.compile(r"^step(\d+)(?:-(\d+))?$")
_saving_step: int | None = None  # the step being saved (for the "write" fault injection)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or trusted; the message names the path."""


def _maybe_kill(step: int, phase: str) -> None:
    """The fault injection of ``KILL_IN_SAVE_ENV`` (tests only)."""
    want = os.environ.get(KILL_IN_SAVE_ENV)
    if want and want in (f"{step}:{phase}", *((str(step),) if phase == "trainer" else ())):
        os.kill(os.getpid(), signal.SIGKILL)


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


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- loading without unpickling code ----


def allowed_globals() -> list[Any]:
    """The non-tensor types DeepSpeed puts in its checkpoints (found by loading real ZeRO-2 and
    ZeRO-3 checkpoints with ``torch.serialization.get_unsafe_globals_in_checkpoint``)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's allow-listed types; errors name ``path``.

    A file holding any other Python object (a planted ``__reduce__`` payload) is refused without
    running it.
    """
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused to load: it holds a Python object that is not an allow-listed "
            f"checkpoint type, and it was not unpickled ({first})"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file is missing") from None
    except Exception as exc:  # truncated zip, EOFError, ...
        raise CheckpointError(f"{path}: cannot read checkpoint file ({type(exc).__name__}: {exc})") from exc


def _engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine with atomic writes, safe loads and errors naming files."""

        def save(self, state_dict: Any, path: str) -> None:
            try:
                with atomic_write(path, "wb") as f:
                    torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
            except Exception as exc:
                raise CheckpointError(f"{path}: writing the checkpoint file failed ({exc})") from exc
            if _saving_step is not None:
                _maybe_kill(_saving_step, "write")

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location=map_location)

    return SafeCheckpointEngine


def use_safe_engine(engine: Any) -> None:
    """Route all of ``engine``'s checkpoint file I/O through ``SafeCheckpointEngine`` (idempotent)."""
    cls = _engine_class()
    if type(engine.checkpoint_engine).__name__ != cls.__name__:
        engine.checkpoint_engine = cls(getattr(engine, "_config", None))


# ---- tags, manifest, verification ----


def tag_for(step: int) -> str:
    """Checkpoint tag of an optimizer step; zero-padded so tags sort by step."""
    return f"step{step:08d}"


def tag_key(name: str) -> tuple[int, int] | None:
    """(step, copy) of a tag name (``step00000004`` -> (4, 0), ``step00000004-1`` -> (4, 1))."""
    m = _TAG_RE.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def tags(ckpt_dir: str | Path) -> list[str]:
    """Tag directories in ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and tag_key(p.name) is not None]
    return sorted(found, key=tag_key)


def pointer_tag(ckpt_dir: str | Path) -> str | None:
    """The tag ``LATEST`` names (it may be missing or damaged), or None without a pointer."""
    pointer = Path(ckpt_dir) / POINTER
    return pointer.read_text().strip() if pointer.exists() else None


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag our pointer names, or None when no complete checkpoint exists."""
    tag = pointer_tag(ckpt_dir)
    if tag is not None and not (Path(ckpt_dir) / tag).is_dir():
        pointer = Path(ckpt_dir) / POINTER
        raise FileNotFoundError(f"{pointer} names checkpoint {tag!r}, which is missing from {ckpt_dir}")
    return tag


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(tag_dir: Path, step: int, identity: dict[str, Any]) -> None:
    """Size and sha256 of every file of the tag, plus the run identity; written last, atomically."""
    files = {
        p.relative_to(tag_dir).as_posix(): {"size": p.stat().st_size, "sha256": _digest(p)}
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    write_json_atomic(
        tag_dir / MANIFEST, {"version": 1, "tag": tag_dir.name, "step": step, "files": files, "run": identity}
    )


def verify(tag_dir: str | Path) -> dict[str, Any]:
    """The tag's manifest after checking every file it lists; CheckpointError names the bad path."""
    tag_dir = Path(tag_dir)
    path = tag_dir / MANIFEST
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: checkpoint directory is missing")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the save of {tag_dir.name} did not finish") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a checkpoint manifest ({exc})") from None
    if not files:
        raise CheckpointError(f"{path}: lists no files")
    for name, want in files.items():
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointError(f"{f}: checkpoint file is missing (listed in {path})")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{f}: truncated or altered: {size} bytes, {want['size']} when saved")
        if _digest(f) != want["sha256"]:
            raise CheckpointError(f"{f}: content differs from its sha256 in {path}")
    return manifest


def find_resumable(
    ckpt_dir: str | Path, log: Callable[[str], None] = print, tag: str | None = None
) -> tuple[str, dict] | None:
    """(tag, manifest) of the newest intact checkpoint: the pointer's tag, else the newest older one.

    None when no save ever finished (no pointer, no manifest); CheckpointError (listing every tag's problem) when
    checkpoints exist but none is intact. Tags newer than the pointer's are unfinished saves.
    """
    ckpt_dir = Path(ckpt_dir)
    if tag:  # --resume-tag: exactly that tag, verified, or an error naming it
        if tag_key(tag) is None:
            raise CheckpointError(f"{ckpt_dir / tag}: not a checkpoint tag name (stepNNNNNNNN[-N])")
        return tag, verify(ckpt_dir / tag)
    named = pointer_tag(ckpt_dir)
    found = tags(ckpt_dir)
    if named is None and not found:
        return None
    if named is not None and tag_key(named) is not None:
        older = [t for t in found if tag_key(t) < tag_key(named)]
        candidates = [named, *reversed(older)]
    else:
        candidates = list(reversed(found))
    problems = []
    for tag in candidates:
        if named is None and not (ckpt_dir / tag / MANIFEST).exists():
            # No pointer yet: a tag without manifest is a first save that was cut short.
            log(f"checkpoint {tag} is an unfinished save (no {MANIFEST}); not resuming from it")
            continue
        try:
            manifest = verify(ckpt_dir / tag)
        except CheckpointError as exc:
            problems.append(str(exc))
            log(f"checkpoint {tag} is not usable: {exc}")
            continue
        if problems:
            log(f"resuming from the newest intact checkpoint {ckpt_dir / tag} instead")
        return tag, manifest
    if not problems:
        return None  # only unfinished first saves: nothing was ever checkpointed
    raise CheckpointError(f"{ckpt_dir}: no intact checkpoint to resume from:\n  " + "\n  ".join(problems))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def identity_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for every leaf of the run identity that differs."""
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(now)))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def shard_set_digest(path: str | Path) -> str | None:
    """sha256 of a shard set's content list (name, sha256, count of every shard), None if unreadable."""
    try:
        index = json.loads((Path(path) / "index.json").read_text())
        content = [[s["name"], s.get("sha256"), s.get("count")] for s in index["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def run_identity(cfg: Any, model_cfg: Any, data_path: str, world: int, zero_stage: int) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint's: model, data, layout, ZeRO stage, ranks."""
    conf = dataclasses.asdict(cfg)
    return {
        "world_size": world,
        "zero_stage": int(zero_stage),
        "model": dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else model_cfg,
        "data": {"shard_set_sha256": shard_set_digest(data_path)},
        "config": {k: conf.get(k) for k in RESUME_FIELDS},
    }


# ---- save / load ----


def save(
    engine: Any,
    ckpt_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 2,
    identity: dict[str, Any] | None = None,
) -> str:
    """Save under a new tag, write its manifest, then move the pointer to it; keep the last ``keep``.

    All ranks call this. The tag ``LATEST`` names is never written into or deleted here.
    """
    global _saving_step
    ckpt_dir = Path(ckpt_dir)
    rank0 = _rank() == 0
    bad = nonfinite_weights(getattr(engine, "module", None))
    bad_msg = first_error(f"rank {_rank()}: non-finite weights {bad[:3]}" if bad else None)
    if bad_msg is not None:  # only finite checkpoints are written, so LATEST is always resumable
        raise FloatingPointError(
            f"step {step}: {bad_msg}; not saved: {ckpt_dir / POINTER} still names {pointer_tag(ckpt_dir)}"
        )
    if rank0:
        current = pointer_tag(ckpt_dir)
        tag, n = tag_for(step), 0
        while tag == current:  # a save at the pointer's step goes to a fresh name
            n += 1
            tag = f"{tag_for(step)}-{n}"
        if (ckpt_dir / tag).exists():  # leftover of a save killed before its pointer moved
            shutil.rmtree(ckpt_dir / tag)
    else:
        current = tag = None
    current, tag = _broadcast((current, tag))
    tag_dir = ckpt_dir / tag
    barrier()
    use_safe_engine(engine)
    err = None
    _saving_step = step
    try:
        # Frozen base weights come from the model build (pretrained path or seeded init).
        engine.save_checkpoint(
            str(ckpt_dir),
            tag=tag,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=True,
        )
        tag_dir.mkdir(parents=True, exist_ok=True)
        own = tag_dir / f"trainer_rank{_rank()}.pt"
        try:
            with atomic_write(own, "wb") as f:
                torch.save(trainer_state, f)
        except Exception as exc:
            raise CheckpointError(f"{own}: writing the checkpoint file failed ({exc})") from exc
    except Exception as exc:
        err = f"rank {_rank()}: {exc}"
    finally:
        _saving_step = None
    _maybe_kill(step, "trainer")
    err = first_error(err)
    if err is None and rank0:
        try:
            write_manifest(tag_dir, step, identity or {})
            _maybe_kill(step, "manifest")
            write_text_atomic(ckpt_dir / POINTER, tag + "\n")
            _maybe_kill(step, "pointer")
        except Exception as exc:
            err = f"rank 0: {exc}"
    err = _broadcast(err)
    if err is not None:
        if rank0:
            shutil.rmtree(tag_dir, ignore_errors=True)  # never the pointer's tag (see above)
        barrier()
        raise CheckpointError(
            f"saving checkpoint {tag_dir} failed: {err}; the previous checkpoint "
            f"({ckpt_dir / current if current else 'none'}) is untouched"
        )
    if rank0:
        _prune(ckpt_dir, tag, keep)
    barrier()
    return tag


def nonfinite_weights(module: Any) -> list[str]:
    """Names of trainable parameters (this rank's ZeRO-3 partition) holding NaN or Inf."""
    if module is None:
        return []
    return [
        name
        for name, p in module.named_parameters()
        if p.requires_grad and not torch.isfinite(getattr(p, "ds_tensor", p).detach()).all()
    ]


def _prune(ckpt_dir: Path, tag: str, keep: int) -> None:
    """Keep ``tag`` and the newest ``keep - 1`` older tags; tags newer than ``tag`` are dead saves."""
    key = tag_key(tag)
    older = [t for t in tags(ckpt_dir) if tag_key(t) < key]
    newer = [t for t in tags(ckpt_dir) if tag_key(t) > key]
    for t in older[: max(0, len(older) - (keep - 1))] + newer:
        shutil.rmtree(ckpt_dir / t, ignore_errors=True)


def load(
    engine: Any,
    ckpt_dir: str | Path,
    identity: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    tag: str | None = None,
    allow: tuple[str, ...] = (),
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Load the newest intact checkpoint into ``engine``; (client_state, this rank's trainer state).

    Rank 0 verifies and chooses the tag; a run identity that differs from the checkpoint's is
    refused, naming what changed, before DeepSpeed reads anything.
    """
    ckpt_dir = Path(ckpt_dir)
    choice, err = None, None
    if _rank() == 0:
        try:
            choice = find_resumable(ckpt_dir, log, tag)
        except CheckpointError as exc:
            err = str(exc)
    choice, err = _broadcast((choice, err))
    if err is not None:
        raise CheckpointError(err)
    if choice is None:
        return None
    tag, manifest = choice
    if identity is not None:
        saved = _flatten(json.loads(json.dumps(manifest.get("run", {}))))
        changes = [
            c
            for c in identity_changes(manifest.get("run", {}), identity)
            if c.split(":")[0] in saved  # a field older checkpoints did not record is not a change
            and c.split(":")[0].removeprefix("config.") not in allow
        ]
        if changes:
            raise ValueError(
                f"cannot resume from {ckpt_dir / tag}: the run differs from the checkpoint's: "
                + "; ".join(changes)
                + " (--allow-change KEY accepts a change of the schedule on purpose)"
            )
    use_safe_engine(engine)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
    if path is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load the checkpoint")
    own = ckpt_dir / tag / f"trainer_rank{_rank()}.pt"
    if not own.exists():
        raise CheckpointError(
            f"{own} is missing: the checkpoint was written by fewer ranks than this run has; "
            "resume with the same number of processes"
        )
    return client_state, safe_load(own)


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

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()
