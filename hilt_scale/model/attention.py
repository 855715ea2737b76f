"""HILT's attention ``q + softmax(q kv^T * scale) kv`` (no projections), by implementation.

``eager`` is the kernels' fp64-capable reference, ``sdpa`` torch's fused attention, ``triton`` the
fused kernel of ``hilt_kernels`` (imported only when chosen; falls back to sdpa without CUDA/Triton).
Footprint-local keys (``connector.keys=footprint``) need none of them: ``footprint_attention``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from hilt_kernels.reference import hilt_attention_reference

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Warn one time per message, so a fallback inside the step loop does not flood the log."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def attn_scale_value(attn_scale: str, width: int) -> float:
    """Softmax scale: 1/sqrt(C) for ``"rsqrt"``, 1.0 for the paper's literal ``"paper"`` formula;
    for ``"learned"`` the starting value of the trained temperature, 1/sqrt(C)."""
    if attn_scale in ("rsqrt", "learned"):
        return 1.0 / math.sqrt(width)
    if attn_scale == "paper":
        return 1.0
    raise ValueError(f"connector.attn_scale={attn_scale!r}; expected 'rsqrt', 'paper' or 'learned'")


def triton_kernel_function():
    """Our fused ``hilt_kernels.hilt_attention`` when triton imports here, else None.

    Imported by its full name, never as ``kernels``: that import name belongs to Hugging Face's
    package (required by transformers), which has no ``hilt_attention``.
    """
    try:
        import hilt_kernels  # noqa: PLC0415 - optional: import only when asked for
    except ImportError:
        return None
    return hilt_kernels.hilt_attention if hilt_kernels.triton_available() else None


def _triton_hilt_attention():
    """The Triton kernel when it can run here (CUDA + Triton), else None."""
    return triton_kernel_function() if torch.cuda.is_available() else None


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def footprint_factor(hr_grid: tuple[int, int, int], n_lr: int) -> int:
    """The HR/LR token factor f of connector.keys=footprint (the same on every axis), else an error."""
    n_hr = math.prod(hr_grid)
    f = round((n_hr / n_lr) ** (1 / 3))
    if f < 1 or f**3 * n_lr != n_hr or any(g % f for g in hr_grid):
        raise ValueError(
            f"connector.keys=footprint: HR token grid {tuple(hr_grid)} and {n_lr} LR tokens have no "
            "common isotropic factor"
        )
    return f


def footprint_mask(hr_grid: tuple[int, int, int], n_lr: int, device: torch.device | None = None) -> torch.Tensor:
    """[N_lr, N_hr] bool: True where the HR token lies inside the LR token's patch (tokens in
    row-major (D, H, W) order; the HR/LR factor is the same on every axis)."""
    f = footprint_factor(hr_grid, n_lr)
    d, h, w = (torch.arange(g, device=device) // f for g in hr_grid)
    lr_h, lr_w = hr_grid[1] // f, hr_grid[2] // f
    owner = ((d[:, None, None] * lr_h + h[None, :, None]) * lr_w + w[None, None, :]).flatten()
    return owner[None, :] == torch.arange(n_lr, device=device)[:, None]


def footprint_blocks(kv: torch.Tensor, hr_grid: tuple[int, int, int], n_lr: int) -> torch.Tensor:
    """[B, N_hr, C] HR tokens (row-major (D, H, W)) -> [B, N_lr, f^3, C]: each LR token's own HR
    tokens, the LR tokens in row-major order (the grouping ``footprint_mask`` describes)."""
    f, (gd, gh, gw) = footprint_factor(hr_grid, n_lr), hr_grid
    b, _, c = kv.shape
    blocks = kv.reshape(b, gd // f, f, gh // f, f, gw // f, f, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return blocks.reshape(b, n_lr, f**3, c)


def footprint_attention(
    q: torch.Tensor, kv: torch.Tensor, hr_grid: tuple[int, int, int], scale: float | torch.Tensor, heads: int = 1
) -> torch.Tensor:
    """``q + softmax(q kv^T * scale) kv`` with each LR query reading only the f^3 HR tokens of its
    own patch (connector.keys=footprint), computed block by block: O(N_hr * C), no [N_lr, N_hr]
    score matrix and no fused kernel needed. Equal to the masked form (``footprint_mask``)."""
    b, n, c = q.shape
    blocks = footprint_blocks(kv, hr_grid, n).reshape(b, n, -1, heads, c // heads)  # [B, N, K, h, c']
    qh = q.reshape(b, n, heads, c // heads)
    logits = torch.einsum("bnhc,bnkhc->bnhk", qh, blocks) * scale
    mixed = torch.einsum("bnhk,bnkhc->bnhc", torch.softmax(logits, dim=-1), blocks)
    return q + mixed.reshape(b, n, c)


def attention_entropy(
    q: torch.Tensor,
    kv: torch.Tensor,
    scale: float | torch.Tensor,
    heads: int = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entropy (nats) of each query's softmax(q kv^T * scale) over the keys (those ``mask`` allows),
    averaged over batch, heads and queries: log(N_keys) = uniform mixing, 0 = each query reads one key."""
    if heads > 1:
        q, kv = _split_heads(q, heads), _split_heads(kv, heads)
    logits = (q.float() @ kv.float().transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean()


def hilt_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    scale: float | torch.Tensor,
    impl: str = "sdpa",
    heads: int = 1,
) -> torch.Tensor:
    """``q + softmax(q kv^T * scale) kv`` with the chosen implementation (eager | sdpa | triton).

    ``heads > 1`` splits the channels of [B, N, C] inputs into heads of C/heads, attends per head
    and merges them again (the paper uses one head). A tensor ``scale`` (a learned temperature)
    scales the query inside the softmax only: ``q + [qs + softmax(qs kv^T) kv] - qs`` with
    ``qs = q * scale``, so every implementation (the fused kernel too) runs at scale 1 and the
    gradient reaches the temperature through ``qs``. Footprint-local keys: ``footprint_attention``.
    """
    if isinstance(scale, torch.Tensor):
        qs = q * scale.to(q.dtype)
        return q - qs + hilt_attention(qs, kv, 1.0, impl, heads)
    if heads > 1:
        b, n, c = q.shape
        out = hilt_attention(_split_heads(q, heads), _split_heads(kv, heads), scale, impl)
        return out.transpose(1, 2).reshape(b, n, c)
    if impl == "triton":
        fn = _triton_hilt_attention() if q.is_cuda else None
        if fn is not None:
            return fn(q, kv, kv, scale=scale)
        _warn_once(
            "HILT attention: Triton kernel unavailable here (needs CUDA, triton, hilt_kernels.hilt_attention); using sdpa"
        )
        impl = "sdpa"
    if impl == "eager":
        return hilt_attention_reference(q, kv, kv, scale=scale)
    if impl == "sdpa":
        return q + F.scaled_dot_product_attention(q, kv, kv, scale=scale)
    raise ValueError(f"connector.attn_impl={impl!r}; expected eager, sdpa or triton")


def check_heads(heads: int, width: int) -> int:
    """``heads`` when it divides the vision width; else an error naming connector.heads."""
    if heads < 1 or width % heads:
        raise ValueError(f"connector.heads={heads} must be >= 1 and divide the vision width {width}")
    return heads
