"""Eager reference of HILT attention: ``q + softmax(q @ k^T * scale) @ v``.

The definition that the Triton kernel, its tests and its benchmark are compared against. Pass
float64 tensors for a ground truth; any floating dtype works.
"""

import math

import torch


def hilt_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Residual cross-attention of HILT on [B, N', C] or [B, H, N', d] inputs (K, V: [..., N, d]).

    ``scale=None`` means 1/sqrt(d); ``scale=1.0`` is the paper's literal formula (no scaling).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    # Softmax in at least fp32 (bf16 logits lose too much) and in fp64 when given fp64.
    attn = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return q + torch.matmul(attn.to(q.dtype), v)
