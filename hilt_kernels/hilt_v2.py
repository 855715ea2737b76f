"""Fused HILT attention v2: ``q + softmax(q @ k^T * scale) @ v`` built around the key loop.

HILT has few queries (N' = 64) and many keys (N = 4096 to 32768), one head of width C = 768 with
K = V. v1 (``hilt_v1.py``) tiled C over grid programs, so each program recomputed all of Q K^T and
re-read K. v2 gives one program *all of C* for a range of keys:

- Q is loaded once per program and kept on chip as up to 4 chunks of BLOCK_D columns (C = 768:
  three 256-wide chunks q0, q1, q2), as are the fp32 accumulators acc0..acc3.
- The key loop is a software pipeline (``tl.range(..., num_stages=NUM_STAGES)``): the K chunks of
  the next key blocks are in flight while the current one is used. S = sum_c q_c k_c^T, online
  softmax in base 2, then acc_c += P v_c. When K is V the same on-chip chunk k_c is v_c: the
  FlashMLA layout, one tile feeds both products and K is read once.
- The work is split over the keys (flash-decoding) with FlashAttention-2's heuristic (the fewest
  splits that fill the SMs, ``launch.fa2_num_splits``); a small combine kernel (v1's) merges the
  fp32 partials with their log-sum-exp weights and adds the residual q.

Narrow heads (12 x 64) are the same kernel with one chunk. The backward is ``hilt_v2_bwd.py``.
Triton 3.6 and 3.9: pointer arithmetic, no block pointers, no autotune; CPU runs use the
interpreter (``TRITON_INTERPRET=1``, fp32 / fp16 only).
"""

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from hilt_kernels.launch import (
    MAX_CHUNKS,
    FusedConfig,
    dot_precision,
    fa2_num_splits,
    launch,
    num_sms,
    pick_fused_config,
    pow2,
    same_data,
    split_keys,
)
from hilt_kernels.split_combine import (
    COMBINE_BLOCK_M,
    LOG2E,
    SUPPORTED_DTYPES,
    _fwd_combine_kernel,
    check_inputs,
)

__all__ = ["hilt_attention", "SUPPORTED_DTYPES"]


def _fwd_kernel(
    Q, K, V, Acc, Mx, Lx,  # Acc [S, BH, M, D] fp32; Mx, Lx [S, BH, M] fp32
    qk_scale, M_Q, N_K, H, keys_per_split,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    HEAD_DIM: tl.constexpr, SAME_KV: tl.constexpr, NC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One key split x one query block, all of C: partial (m, l, acc) for its keys."""
    pid_m = tl.program_id(0)  # fastest: the query blocks sharing a key range run together (L2)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M_Q
    offs_d = tl.arange(0, BLOCK_D)
    q_ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + offs_d[None, :] * skd
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + offs_d[None, :] * svd

    # Q once per program, chunk c = columns [c * BLOCK_D, (c + 1) * BLOCK_D); masks on C fold away
    # at compile time when HEAD_DIM is a multiple of BLOCK_D.
    md0 = offs_d < HEAD_DIM
    q0 = tl.load(q_ptr, mask=mask_m[:, None] & md0[None, :], other=0.0)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if NC > 1:
        md1 = offs_d + BLOCK_D < HEAD_DIM
        q1 = tl.load(q_ptr + BLOCK_D * sqd, mask=mask_m[:, None] & md1[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if NC > 2:
        md2 = offs_d + 2 * BLOCK_D < HEAD_DIM
        q2 = tl.load(q_ptr + 2 * BLOCK_D * sqd, mask=mask_m[:, None] & md2[None, :], other=0.0)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if NC > 3:
        md3 = offs_d + 3 * BLOCK_D < HEAD_DIM
        q3 = tl.load(q_ptr + 3 * BLOCK_D * sqd, mask=mask_m[:, None] & md3[None, :], other=0.0)
        acc3 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, N_K)
    for start_n in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k_ptr = k_base + offs_n[:, None] * skn
        v_ptr = v_base + offs_n[:, None] * svn
        # S = sum_c q_c k_c^T; the K chunks stay on chip for P V when K is V.
        k0 = tl.load(k_ptr, mask=mask_n[:, None] & md0[None, :], other=0.0)
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        if NC > 1:
            k1 = tl.load(k_ptr + BLOCK_D * skd, mask=mask_n[:, None] & md1[None, :], other=0.0)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
        if NC > 2:
            k2 = tl.load(k_ptr + 2 * BLOCK_D * skd, mask=mask_n[:, None] & md2[None, :], other=0.0)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)
        if NC > 3:
            k3 = tl.load(k_ptr + 3 * BLOCK_D * skd, mask=mask_n[:, None] & md3[None, :], other=0.0)
            s = tl.dot(q3, tl.trans(k3), s, input_precision=PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        # Online softmax in base 2 (qk_scale folds in log2 e); every block holds >= 1 valid key.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        p = p.to(k0.dtype)
        if SAME_KV:
            v0 = k0
        else:
            v0 = tl.load(v_ptr, mask=mask_n[:, None] & md0[None, :], other=0.0)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if NC > 1:
            if SAME_KV:
                v1 = k1
            else:
                v1 = tl.load(v_ptr + BLOCK_D * svd, mask=mask_n[:, None] & md1[None, :], other=0.0)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)
        if NC > 2:
            if SAME_KV:
                v2 = k2
            else:
                v2 = tl.load(v_ptr + 2 * BLOCK_D * svd, mask=mask_n[:, None] & md2[None, :], other=0.0)
            acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=PRECISION)
        if NC > 3:
            if SAME_KV:
                v3 = k3
            else:
                v3 = tl.load(v_ptr + 3 * BLOCK_D * svd, mask=mask_n[:, None] & md3[None, :], other=0.0)
            acc3 = tl.dot(p, v3, acc3 * alpha[:, None], input_precision=PRECISION)

    row = (pid_s * tl.num_programs(2) + pid_bh).to(tl.int64) * M_Q
    acc_ptr = Acc + (row + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(acc_ptr, acc0, mask=mask_m[:, None] & md0[None, :])
    if NC > 1:
        tl.store(acc_ptr + BLOCK_D, acc1, mask=mask_m[:, None] & md1[None, :])
    if NC > 2:
        tl.store(acc_ptr + 2 * BLOCK_D, acc2, mask=mask_m[:, None] & md2[None, :])
    if NC > 3:
        tl.store(acc_ptr + 3 * BLOCK_D, acc3, mask=mask_m[:, None] & md3[None, :])
    tl.store(Mx + row + offs_m, m_i, mask=mask_m)
    tl.store(Lx + row + offs_m, l_i, mask=mask_m)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output; tests replace this with a NaN fill to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def forward_splits(cfg: FusedConfig, bh: int, m: int, n: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys_per_split) of the forward: FA2 heuristic unless the config fixes it. Cached
    per (config, shape, device): the host decides once per shape, not per call."""
    return _forward_splits(cfg, bh, m, n, device)


@functools.lru_cache(maxsize=1024)
def _forward_splits(cfg: FusedConfig, bh: int, m: int, n: int, device: torch.device) -> tuple[int, int]:
    programs = bh * triton.cdiv(m, cfg.block_m)
    want = cfg.num_splits or fa2_num_splits(
        programs, num_sms(device) * cfg.programs_per_sm, triton.cdiv(n, cfg.block_n)
    )
    return split_keys(n, cfg.block_n, want)


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cfg: FusedConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split + combine on [B, H, M, D]: (q + O, O in fp32, LSE in base 2)."""
    bsz, heads, m, d = q.shape
    n = k.shape[2]
    bh = bsz * heads
    n_m = triton.cdiv(m, cfg.block_m)
    splits, keys_per_split = forward_splits(cfg, bh, m, n, q.device)
    acc = _empty((splits, bh, m, d), torch.float32, q.device)
    mx = _empty((splits, bh, m), torch.float32, q.device)
    lx = _empty((splits, bh, m), torch.float32, q.device)
    launch(
        _fwd_kernel,
        (n_m, splits, bh),
        q, k, v, acc, mx, lx,
        scale * LOG2E, m, n, heads, keys_per_split,
        *q.stride(), *k.stride(), *v.stride(),
        HEAD_DIM=d, SAME_KV=same_data(k, v), NC=cfg.chunks(d),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        NUM_STAGES=cfg.num_stages, PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip

    out = _empty((bsz, heads, m, d), q.dtype, q.device)
    o_attn = _empty((bsz, heads, m, d), torch.float32, q.device)
    lse = _empty((bsz, heads, m), torch.float32, q.device)
    block_d = min(pow2(d), 64)  # small combine tiles: enough programs to stream the partials
    launch(
        _fwd_combine_kernel,
        (triton.cdiv(m, COMBINE_BLOCK_M) * triton.cdiv(d, block_d), bh),
        q, acc, mx, lx, out, o_attn, lse,
        splits, m, d, heads,
        *q.stride(), *out.stride(),
        BLOCK_M=COMBINE_BLOCK_M, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out, o_attn, lse


class _HiltAttentionV2(torch.autograd.Function):
    """Autograd wrapper; ``v=None`` means K is V and a single gradient (dK + dV) is returned."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, v, scale, cfg):
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            out, o_attn, lse = _forward(q, k, k if v is None else v, scale, cfg)
        ctx.save_for_backward(q, k, v, o_attn, lse)
        ctx.scale = scale
        ctx.cfg = cfg
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, dout):
        from hilt_kernels.hilt_v2_bwd import backward

        q, k, v, o_attn, lse = ctx.saved_tensors
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            dq, dk, dv = backward(q, k, v, dout, o_attn, lse, ctx.scale, ctx.cfg, ctx.needs_input_grad)
        return dq, dk, dv, None, None


def autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast for the inputs' device type, q, k, v in the autocast dtype (k is v kept:
    cast once), like a matmul under autocast; otherwise unchanged. The cast is differentiable, so
    fp32 leaves get fp32 gradients."""
    kind = q.device.type
    if not torch.is_autocast_enabled(kind) or not q.is_floating_point() or q.dtype == torch.float64:
        return q, k, v  # autocast leaves float64 alone too
    dtype = torch.get_autocast_dtype(kind)
    k_cast = k.to(dtype)
    return q.to(dtype), k_cast, k_cast if v is k else v.to(dtype)


def hilt_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    config: FusedConfig | None = None,
) -> torch.Tensor:
    """v2 of ``q + softmax(q @ k^T * scale) @ v`` on [B, N', C] or [B, H, N', d]; differentiable.

    ``scale=None`` means 1/sqrt(d). ``k is v`` reads K once and gives it one gradient. Heads for
    which no v2 config fits in shared memory (``launch.pick_fused_config`` returns None) go to v1.
    Under autocast the inputs are cast to the autocast dtype first (``autocast_inputs``).
    """
    q, k, v = autocast_inputs(q, k, v)
    check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    d = q.shape[-1]
    cfg = config or pick_fused_config(q.shape[-2], k.shape[-2], d, q.dtype, same_kv=same_data(k, v))
    if cfg is None:  # no v2 config fits in shared memory (``launch.config_fits``): v1
        from hilt_kernels.hilt_v1 import hilt_attention as v1

        return v1(q, k, v, scale=scale)
    if cfg.chunks(d) > MAX_CHUNKS:
        raise ValueError(
            f"hilt_attention v2: C={d} needs {cfg.chunks(d)} chunks of {cfg.block_d}, max {MAX_CHUNKS}"
        )
    aliased = k is v
    single_head = q.dim() == 3
    if single_head:
        q, k = q.unsqueeze(1), k.unsqueeze(1)
        v = k if aliased else v.unsqueeze(1)
    out = _HiltAttentionV2.apply(q, k, None if aliased else v, float(scale), cfg)
    return out.squeeze(1) if single_head else out
