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
    vols = [s["hr"] for s in samples]
    vols = [v[0] if v.ndim == 4 else v for v in vols]  # [1, D, H, W] -> [D, H, W]
    if vols and all(isinstance(v, np.ndarray) for v in vols):
        hr = torch.from_numpy(np.stack(vols))[:, None]  # one copy; also makes read-only buffers writable
    elif vols:
        hr = torch.stack([torch.as_tensor(v) for v in vols])[:, None]
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
