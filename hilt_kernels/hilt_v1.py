"""Fused Triton HILT cross-attention: ``q + softmax(q @ k^T * scale) @ v``, forward and backward.

HILT attends few queries (N' = 64 low-resolution tokens) over thousands of keys (N = 4096 to 32768
high-resolution tokens), in the paper's form as one head of width C = 768 with K and V the same
tensor. The usual flash layout (one program per query block) would leave most of a GPU idle, so
the forward splits the work over the keys (flash-decoding): every program owns a range of keys and
a block of queries, keeps its score block on chip, and writes a partial ``(m, l, acc)``; a small
combine kernel merges the partials with their log-sum-exp weights and adds the residual ``q``.
A wide head (C up to 1024) is tiled along C: in ``q @ k^T`` by a loop over C chunks, in ``p @ v``
by a grid axis over output column blocks. When K and V are the same data, a key tile is loaded
once and used for both products where the tiles coincide.

Backward (the derivative, with ``O = softmax(S) V``, ``S = q k^T * scale``, ``P = softmax(S)``):

    out = q + O
    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - delta),   delta = rowsum(dO * O)        (softmax Jacobian)
    dQ = dO + (dS K) * scale                               (the residual passes dO through)
    dK = (dS^T Q) * scale

P is recomputed from the saved log-sum-exp (scores are never stored), in one of two ways:
- narrow heads (d <= 128, multi-head): flash-attention-2 style, one program per key block keeps
  dK and dV on chip over all queries (one gradient dK + dV written when ``k is v``), and a split-K
  kernel like the forward accumulates dQ;
- wide heads (the paper's C = 768): dK, dV [BLOCK_N, C] do not fit on chip, so a kernel writes P
  and ``dS * scale`` once as an [2N', N] tensor (1/6 of the bytes of K at C = 768) and cuBLAS does
  the three GEMMs (dQ, dK, dV); when ``k is v`` one GEMM ``[P; dS*scale]^T [dO; Q]`` writes dK + dV.

Accumulation is in fp32; inputs may be bf16, fp16 or fp32. Runs on CUDA, and on a CPU through the
Triton interpreter when ``TRITON_INTERPRET=1`` is set by launch time (see ``kernels/launch.py``).
Written for triton 3.6 (the GPU machine's) and 3.9: pointer arithmetic only (no
``tl.make_block_ptr``), no autotune; compiled for sm_90 with both, run in the 3.9 interpreter.
"""

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from hilt_kernels.launch import (
    NARROW_HEAD,
    KernelConfig,
    dot_precision,
    launch,
    num_splits,
    pick_config,
    pow2,
    same_data,
)
from hilt_kernels.split_combine import (
    COMBINE_BLOCK_M,
    LOG2E,
    _fwd_combine_kernel,
    check_inputs,
)

# ----------------------------------------------------------------------------------------------
# Triton kernels. They are plain functions here and wrapped with ``triton.jit`` on first use
# (``hilt_kernels.launch.launch``), so that TRITON_INTERPRET is read at launch, not at import.
# ----------------------------------------------------------------------------------------------


def _fwd_split_kernel(
    Q, K, V, Acc, Mx, Lx,  # Acc [S, BH, M, D] fp32; Mx, Lx [S, BH, M] fp32
    qk_scale, M_Q, N_K, D, H, keys_per_split,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    V_IS_K_TILE: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One key split x one query block x one output column block: partial (m, l, acc)."""
    pid_s = tl.program_id(0)
    pid_md = tl.program_id(1)
    pid_bh = tl.program_id(2)
    n_dv = tl.cdiv(D, BLOCK_DV)
    pid_m = pid_md // n_dv
    pid_dv = pid_md % n_dv
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M_Q
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < D
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh

    if ONE_CHUNK:  # the whole head fits one tile: load Q once for all key blocks
        q_tile = tl.load(
            q_base + offs_m[:, None] * sqm + offs_dk[None, :] * sqd,
            mask=mask_m[:, None] & (offs_dk[None, :] < D),
            other=0.0,
        )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, N_K)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        if ONE_CHUNK:
            k_tile = tl.load(
                k_base + offs_n[:, None] * skn + offs_dk[None, :] * skd,
                mask=mask_n[:, None] & (offs_dk[None, :] < D),
                other=0.0,
            )
            s = tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION)
        else:
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_DK):
                dk = d0 + offs_dk
                mask_d = dk < D
                q_c = tl.load(
                    q_base + offs_m[:, None] * sqm + dk[None, :] * sqd,
                    mask=mask_m[:, None] & mask_d[None, :],
                    other=0.0,
                )
                k_c = tl.load(
                    k_base + offs_n[:, None] * skn + dk[None, :] * skd,
                    mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0,
                )
                s += tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        # Online softmax in base 2 (qk_scale folds in log2(e)); every block holds >= 1 valid key.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_IS_K_TILE:
            v_tile = k_tile  # K is V and one tile covers the head: read once
        else:
            v_tile = tl.load(
                v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=mask_n[:, None] & mask_dv[None, :],
                other=0.0,
            )
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=PRECISION)
        m_i = m_new

    row = (pid_s * tl.num_programs(2) + pid_bh).to(tl.int64) * M_Q
    tl.store(
        Acc + (row + offs_m)[:, None] * D + offs_dv[None, :],
        acc,
        mask=mask_m[:, None] & mask_dv[None, :],
    )
    if pid_dv == 0:  # the statistics are the same for every column block
        tl.store(Mx + row + offs_m, m_i, mask=mask_m)
        tl.store(Lx + row + offs_m, l_i, mask=mask_m)


def _bwd_p_ds_kernel(
    Q, K, V, DO, Lse, Delta, PdS,  # Lse, Delta [BH, M] fp32; PdS [BH, 2M, N]: P rows, then dS rows
    qk_scale, scale, M_Q, N_K, D, H,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    SAME_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Recompute P from the LSE and dP = dO V^T over C chunks; write P and dS * scale."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M_Q
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_K
    offs_dk = tl.arange(0, BLOCK_DK)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh

    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DK):
        dk = d0 + offs_dk
        mask_d = dk < D
        mask_md = mask_m[:, None] & mask_d[None, :]
        mask_nd = mask_n[:, None] & mask_d[None, :]
        q_c = tl.load(q_base + offs_m[:, None] * sqm + dk[None, :] * sqd, mask=mask_md, other=0.0)
        do_c = tl.load(do_base + offs_m[:, None] * sdm + dk[None, :] * sdd, mask=mask_md, other=0.0)
        k_c = tl.load(k_base + offs_n[:, None] * skn + dk[None, :] * skd, mask=mask_nd, other=0.0)
        if SAME_KV:
            v_c = k_c  # K is V: one load feeds both products
        else:
            v_c = tl.load(v_base + offs_n[:, None] * svn + dk[None, :] * svd, mask=mask_nd, other=0.0)
        s += tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION)
        dp += tl.dot(do_c.to(v_c.dtype), tl.trans(v_c), input_precision=PRECISION)

    base = pid_bh.to(tl.int64) * M_Q
    lse = tl.load(Lse + base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(Delta + base + offs_m, mask=mask_m, other=0.0)
    mask = mask_m[:, None] & mask_n[None, :]
    p = tl.where(mask, tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
    ds = p * (dp - delta[:, None]) * scale
    p_ptr = PdS + pid_bh.to(tl.int64) * (2 * M_Q) * N_K + offs_m[:, None] * N_K + offs_n[None, :]
    tl.store(p_ptr, p.to(PdS.dtype.element_ty), mask=mask)
    tl.store(p_ptr + M_Q * N_K, ds.to(PdS.dtype.element_ty), mask=mask)


def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,  # DK, DV [B, H, N, D] in the input dtype; DV unused if SUM_KV
    qk_scale, scale, M_Q, N_K, D, H,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    SAME_KV: tl.constexpr, SUM_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Narrow heads (d <= 128): one key block, all queries; dK and dV accumulate on chip.

    Flash-attention-2 style: dV += P^T dO, dK += (dS * scale)^T Q over query blocks; with SUM_KV
    (``k is v``) the single gradient dK + dV is written once.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_K
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    k_tile = tl.load(
        K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
        mask=mask_nd,
        other=0.0,
    )
    if SAME_KV:
        v_tile = k_tile  # K is V: read once
    else:
        v_tile = tl.load(
            V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
            mask=mask_nd,
            other=0.0,
        )

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    stats = pid_bh.to(tl.int64) * M_Q
    for m0 in range(0, M_Q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M_Q
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=mask_md, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=mask_md, other=0.0)
        lse = tl.load(Lse + stats + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(Delta + stats + offs_m, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(k_tile), input_precision=PRECISION)
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v_tile), input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * scale
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    out = pid_bh.to(tl.int64) * N_K * D + offs_n[:, None] * D + offs_d[None, :]
    if SUM_KV:
        tl.store(DK + out, (dk + dv).to(DK.dtype.element_ty), mask=mask_nd)
    else:
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask_nd)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_nd)


def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQp,  # DQp [S, BH, M, D] fp32: per-split partial (dS * scale) K
    qk_scale, scale, M_Q, N_K, D, H, keys_per_split,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    SAME_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Narrow heads: dQ's attention part split over the keys like the forward, partials in fp32."""
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M_Q
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(
        Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=mask_md,
        other=0.0,
    )
    do = tl.load(
        DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
        mask=mask_md,
        other=0.0,
    )
    stats = pid_bh.to(tl.int64) * M_Q
    lse = tl.load(Lse + stats + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(Delta + stats + offs_m, mask=mask_m, other=0.0)
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, N_K)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k_tile = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mask_nd, other=0.0)
        if SAME_KV:
            v_tile = k_tile
        else:
            v_tile = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k_tile), input_precision=PRECISION)
        p = tl.where(mask_n[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v_tile), input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * scale
        acc += tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=PRECISION)

    row = (pid_s * tl.num_programs(2) + pid_bh).to(tl.int64) * M_Q
    tl.store(DQp + (row + offs_m)[:, None] * D + offs_d[None, :], acc, mask=mask_md)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output; tests replace this with a NaN fill to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Host launchers (4-D [B, H, M, D] tensors).
# ----------------------------------------------------------------------------------------------


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cfg: KernelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run split + combine; return (q + O, O in fp32, LSE in base 2) for [B, H, M, D] inputs."""
    bsz, heads, m, d = q.shape
    n = k.shape[2]
    cfg = cfg or pick_config(m, n, d, q.dtype)
    bh = bsz * heads
    n_m = triton.cdiv(m, cfg.block_m)
    n_dv = triton.cdiv(d, cfg.block_dv)
    splits = num_splits(cfg, n, n_m * n_dv * bh, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(n, splits), cfg.block_n) * cfg.block_n
    splits = triton.cdiv(n, keys_per_split)  # every split now holds at least one key
    same_kv = same_data(k, v)  # K is V: one tile feeds both products where they coincide
    one_chunk = cfg.block_dk >= d and cfg.block_dv >= d and cfg.block_dk == cfg.block_dv

    acc = _empty((splits, bh, m, d), torch.float32, q.device)
    mx = _empty((splits, bh, m), torch.float32, q.device)
    lx = _empty((splits, bh, m), torch.float32, q.device)
    launch(
        _fwd_split_kernel,
        (splits, n_m * n_dv, bh),
        q, k, v, acc, mx, lx,
        scale * LOG2E, m, n, d, heads, keys_per_split,
        *q.stride(), *k.stride(), *v.stride(),
        V_IS_K_TILE=same_kv and one_chunk, ONE_CHUNK=one_chunk,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_DK=cfg.block_dk, BLOCK_DV=cfg.block_dv,
        PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
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


def _backward_p_ds(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
    cfg: KernelConfig | None = None,
) -> torch.Tensor:
    """Return [B, H, 2M, N]: P in rows [0, M), dS * scale in rows [M, 2M), in q's dtype."""
    bsz, heads, m, d = q.shape
    n = k.shape[2]
    cfg = cfg or pick_config(m, n, d, q.dtype)
    pds = _empty((bsz, heads, 2 * m, n), q.dtype, q.device)
    grid = (triton.cdiv(n, cfg.bwd_block_n), triton.cdiv(m, cfg.bwd_block_m), bsz * heads)
    launch(
        _bwd_p_ds_kernel,
        grid,
        q, k, v, do, lse, delta, pds,
        scale * LOG2E, scale, m, n, d, heads,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        SAME_KV=same_data(k, v),
        BLOCK_M=cfg.bwd_block_m, BLOCK_N=cfg.bwd_block_n, BLOCK_DK=cfg.bwd_block_dk,
        PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.bwd_num_stages,
    )  # fmt: skip
    return pds


def _backward_narrow(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
    sum_kv: bool,
    cfg: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fused backward for heads d <= 128: (dq, dk, dv); with ``sum_kv`` dk holds dK + dV, dv None."""
    bsz, heads, m, d = q.shape
    n = k.shape[2]
    bh = bsz * heads
    d_pad = pow2(d)
    same_kv = same_data(k, v)
    common = dict(SAME_KV=same_kv, BLOCK_M=cfg.bwd_block_m, BLOCK_D=d_pad, PRECISION=dot_precision(q.dtype))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())

    dk = _empty((bsz, heads, n, d), q.dtype, q.device)
    dv = dk if sum_kv else _empty((bsz, heads, n, d), q.dtype, q.device)
    launch(
        _bwd_dkdv_kernel,
        (triton.cdiv(n, cfg.bwd_block_n), bh),
        q, k, v, do, lse, delta, dk, dv,
        scale * LOG2E, scale, m, n, d, heads, *strides,
        SUM_KV=sum_kv, BLOCK_N=cfg.bwd_block_n, **common,
        num_warps=cfg.num_warps, num_stages=cfg.bwd_num_stages,
    )  # fmt: skip

    n_m = triton.cdiv(m, cfg.bwd_block_m)
    splits = num_splits(cfg, n, n_m * bh, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(n, splits), cfg.block_n) * cfg.block_n
    splits = triton.cdiv(n, keys_per_split)
    dq_part = _empty((splits, bh, m, d), torch.float32, q.device)
    launch(
        _bwd_dq_kernel,
        (splits, n_m, bh),
        q, k, v, do, lse, delta, dq_part,
        scale * LOG2E, scale, m, n, d, heads, keys_per_split, *strides,
        BLOCK_N=cfg.block_n, **common,
        num_warps=cfg.num_warps, num_stages=cfg.bwd_num_stages,
    )  # fmt: skip
    dq = (do.float() + dq_part.sum(0).view(bsz, heads, m, d)).to(q.dtype)
    return dq, dk, None if sum_kv else dv


class _HiltAttention(torch.autograd.Function):
    """Autograd wrapper; ``v=None`` means K is V and a single gradient (dK + dV) is returned."""

    @staticmethod
    def forward(ctx, q, k, v, scale, cfg):
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            out, o_attn, lse = _forward(q, k, k if v is None else v, scale, cfg)
        ctx.save_for_backward(q, k, v, o_attn, lse)
        ctx.scale = scale
        ctx.cfg = cfg
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, o_attn, lse = ctx.saved_tensors
        aliased = v is None
        v_eff = k if aliased else v
        m = q.shape[2]
        delta = (dout.float() * o_attn).sum(-1)  # rowsum(dO * O), [B, H, M]
        do = dout.to(q.dtype)
        cfg = ctx.cfg or pick_config(m, k.shape[2], q.shape[3], q.dtype)
        if pow2(q.shape[3]) <= NARROW_HEAD:  # fused: no P / dS round trip through memory
            dq, dk, dv = _backward_narrow(q, k, v_eff, do, lse, delta, ctx.scale, aliased, cfg)
            return dq, dk, dv, None, None
        pds = _backward_p_ds(q, k, v_eff, do, lse, delta, ctx.scale, cfg)
        p, ds = pds[:, :, :m], pds[:, :, m:]
        dq = dk = dv = None
        if ctx.needs_input_grad[0]:
            dq = torch.baddbmm(do.flatten(0, 1), ds.flatten(0, 1), k.flatten(0, 1)).view_as(q)
        if aliased and ctx.needs_input_grad[1]:
            dk = torch.matmul(pds.transpose(-1, -2), torch.cat([do, q], dim=2))  # dK + dV in one GEMM
        else:
            if ctx.needs_input_grad[1]:
                dk = torch.matmul(ds.transpose(-1, -2), q)
            if ctx.needs_input_grad[2]:
                dv = torch.matmul(p.transpose(-1, -2), do)
        return dq, dk, dv, None, None


def hilt_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Fused ``q + softmax(q @ k^T * scale) @ v`` on [B, N', C] or [B, H, N', d]; differentiable.

    ``scale=None`` means 1/sqrt(d); ``scale=1.0`` is the paper's literal formula. Passing the same
    tensor as ``k`` and ``v`` reads it once and gives it one gradient. ``config`` overrides the
    tile heuristic (benchmarks and tests).
    """
    check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    aliased = k is v
    single_head = q.dim() == 3
    if single_head:
        q, k = q.unsqueeze(1), k.unsqueeze(1)
        v = k if aliased else v.unsqueeze(1)
    out = _HiltAttention.apply(q, k, None if aliased else v, float(scale), config)
    return out.squeeze(1) if single_head else out
