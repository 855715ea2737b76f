"""Process group, seeding, barrier, and the DeepSpeed JSON's "auto" slots filled from the run.

The launcher (deepspeed, torchrun, or none for a plain ``python``) decides the ranks; here we pick
DeepSpeed's CPU accelerator + gloo without CUDA, NCCL with it.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from hilt_scale.training.config import TrainConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, int]:
    """Pick DeepSpeed's CPU accelerator + gloo without CUDA, init the process group; (rank, world, local)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # plain `python train.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    # On CPU this loads (the first time: compiles) DeepSpeed's shared-memory comm op under a lock file.
    hint = threading.Timer(60.0, lambda: print(comm_op_hint(60), file=sys.stderr, flush=True))
    hint.daemon = True
    if not torch.cuda.is_available():
        hint.start()
    try:
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    finally:
        hint.cancel()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Share the cores between the ranks of this node instead of oversubscribing them.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, per_node)))
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size(), local


def exit_after_run(code: int = 0) -> NoReturn:
    """End a rank right after a finished run: the atexit handlers (METEOR's JVM, ...) run and the
    output streams are flushed, then ``os._exit`` skips the interpreter's teardown.

    After barrier + ``destroy_process_group`` gloo's worker threads are still alive (DeepSpeed keeps
    the groups), and in teardown a rank occasionally aborted with "terminate called without an
    active exception" (exit -6) after every file of the run was written (one CI run, and 1 of 17
    two-rank ZeRO-3 test runs repeated here); the launcher then reports the whole job as failed. Barrier
    followed by context destruction is a known gloo shutdown race (pytorch/gloo#155).
    """
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def comm_op_hint(waited_s: float) -> str:
    """What a start-up that hangs in DeepSpeed's CPU comm op is waiting for, and how to clear it."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory("deepspeed_shm_comm", False)) / "lock"
    except Exception:  # a private torch helper: fall back to its documented default place
        lock = Path("~/.cache/torch_extensions/<python>_cpu/deepspeed_shm_comm/lock").expanduser()
    return (
        f"rank {os.environ.get('RANK', '0')}: still loading DeepSpeed's CPU comm op (deepspeed_shm_comm) "
        f"after {waited_s:.0f} s. Its first build takes ~40 s (longer on a loaded machine). If no c++ or "
        f"ninja process is building it, a run killed during the build left the lock file {lock}, and "
        f"every run waits for it forever: remove it (rm {lock}) and start again."
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so runs (and resumed runs) repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def barrier() -> None:
    """Wait for every rank; a no-op without a process group (tests, single-process tools)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def first_error(err: str | None) -> str | None:
    """Collective: the first rank's error message, or None when every rank succeeded."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return err
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, err)
    return next((e for e in errors if e), None)


def agreed_error(err: str | None) -> str | None:
    """Collective, cheap when all is well: one int all-reduce; the messages are gathered only when
    some rank has one. Every rank gets the first rank's error (or None), so all stop together."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return err
    flag = torch.tensor([int(err is not None)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return first_error(err) if flag.item() else None


def fill_ds_config(path: str | Path, values: dict[str, Any]) -> dict[str, Any]:
    """Load a DeepSpeed JSON and replace every "auto" by ``values[key]``; unknown "auto" keys fail."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"DeepSpeed config {path} does not exist (try ds_configs/zero2.json)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None

    def fill(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, f"{where}.{k}" if where else k) for k, v in node.items()}
        if node == "auto":
            key = where.rsplit(".", 1)[-1]
            if where not in values and key not in values:
                raise KeyError(f"{path}: key {where!r} is 'auto' but train.py has no value for it")
            return values.get(where, values.get(key))
        return node

    return fill(cfg, "")


def ds_values(cfg: TrainConfig, world: int, total_steps: int) -> dict[str, Any]:
    """The numbers the CLI decides for the DeepSpeed config's "auto" slots."""
    on_gpu = torch.cuda.is_available()
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": grad_accum(cfg, world),
        "lr": cfg.lr,
        "warmup_max_lr": cfg.lr,
        "warmup_num_steps": max(1, round(cfg.warmup_ratio * total_steps)),
        "total_num_steps": total_steps,
        "bf16.enabled": on_gpu,  # bf16 on GPU; fp32 on CPU (exact resume, and CPU bf16 is slow)
        "torch_adam": not on_gpu,  # FusedAdam needs CUDA; torch AdamW compiles nothing
    }


def grad_accum(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step so that micro x accum x ranks = total batch."""
    per_step = cfg.micro_batch * world
    if cfg.total_batch % per_step:
        raise ValueError(
            f"--total-batch {cfg.total_batch} is not a multiple of --micro-batch {cfg.micro_batch} x {world} ranks"
        )
    return cfg.total_batch // per_step
