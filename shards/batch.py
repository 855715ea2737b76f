"""The one batch stacker: sample dicts (as ``ShardSet.read`` returns them) -> the model's batch.

Seam 2 of docs/ARCHITECTURE.md: ``{"key": [...], "hr": uint8 [B, 1, D, H, W], "report": [...],
"meta": [...]}``. The loader, the trainer's evaluation and ``generate`` all build batches here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def stack_batch(samples: Sequence[dict], hr_size: Sequence[int] | None = None, dtype: str = "uint8") -> dict:
    """Stack samples with ``hr`` (D, H, W) arrays or tensors into one batch; empty -> a [0, 1, D, H, W] batch.

    ``hr_size`` and ``dtype`` give the shape of an empty batch (all samples skipped).
    """
    vols = []
    for s in samples:
        hr = s["hr"] if torch.is_tensor(s["hr"]) else torch.from_numpy(np.ascontiguousarray(s["hr"]))
        vols.append(hr[0] if hr.dim() == 4 else hr)
    if vols:
        hr = torch.stack(vols)[:, None]
    elif hr_size is not None:
        hr = torch.empty((0, 1, *hr_size), dtype=getattr(torch, dtype))
    else:
        raise ValueError("stack_batch: no samples and no hr_size for an empty batch")
    return {
        "key": [s.get("key") for s in samples],
        "hr": hr,
        "report": [s.get("report") for s in samples],
        "meta": [s.get("meta", {}) for s in samples],
    }
