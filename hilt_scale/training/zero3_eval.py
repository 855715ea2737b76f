"""Evaluation under ZeRO-3 without re-gathering the weights for every generated token.

Under ZeRO-3 each rank holds a shard of every parameter, and DeepSpeed's hooks all-gather a
layer's weights before each forward of it and free them after: ``generate`` pays one all-gather
per layer per token, on every rank in lockstep (``synced_gpus``). Here, when a full copy of the
model fits in the memory each rank has free (measured, not assumed), every rank builds a plain
replica of the model once per evaluation, gathered parameter by parameter (so the peak is the
replica plus one parameter), and generates its share of the evaluation set from it without any
collective. When it does not fit, the evaluation keeps DeepSpeed's per-token gathering.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch
from torch import nn

# HILT_ZERO3_EVAL=per-token keeps DeepSpeed's per-token gathering (to compare, or to rule the replica out).
FORCE_ENV = "HILT_ZERO3_EVAL"
# Head room beyond the replica's weights: generation activations, KV cache, allocator slack.
MARGIN = 1.25


def full_param_bytes(model: nn.Module) -> int:
    """Bytes of every parameter at full size (``ds_numel`` under ZeRO-3) in its dtype."""
    return sum((getattr(p, "ds_numel", None) or p.numel()) * p.element_size() for p in model.parameters())


def free_bytes() -> int:
    """Memory a rank can still use: free CUDA memory plus what torch's allocator holds unused, else
    the node's available RAM shared by its ranks."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"] // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def replica_plan(model: nn.Module) -> dict[str, Any]:
    """Whether every rank can hold a replica (collective: the smallest free memory decides)."""
    import torch.distributed as dist  # noqa: PLC0415

    need = full_param_bytes(model) * MARGIN
    free = torch.tensor([float(free_bytes())], dtype=torch.float64)
    if torch.cuda.is_available():
        free = free.cuda()
    if dist.is_initialized():
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    smallest = float(free.item())
    forced = os.environ.get(FORCE_ENV) == "per-token"
    return {
        "mode": "replica" if need <= smallest and not forced else "per-token gathering",
        "replica_gib": round(need / MARGIN / 2**30, 3),
        "min_free_gib": round(smallest / 2**30, 3),
    }


def build_replica(model: nn.Module) -> nn.Module:
    """A plain copy of a ZeRO-3 partitioned HiltReportModel: built again from its config and
    tokenizer, then every parameter gathered (collective, all ranks) and copied in, one at a time."""
    import deepspeed  # noqa: PLC0415

    from hilt_scale.model.mllm import build_model  # noqa: PLC0415

    with torch.random.fork_rng():  # the build's random init must not move the training RNG
        replica = build_model(model.cfg, tokenizer=model.tokenizer)
    device = next(model.parameters()).device
    own = dict(replica.named_parameters())
    for name, param in model.named_parameters():
        target = own[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            full = param.data.to(device)
            if target.shape != full.shape:
                raise RuntimeError(
                    f"replica parameter {name}: shape {tuple(target.shape)} vs {tuple(full.shape)}"
                )
            target.data = full.clone()
    return replica.to(device).eval()


def free_memory() -> None:
    """Return a dropped replica's memory now rather than at the next collection."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
