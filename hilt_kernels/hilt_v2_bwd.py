"""v2 backward of HILT attention: one streaming pass over the keys, nothing of size N' x N stored.

Derivation. Forward, per (batch, head), with S = Q K^T * scale [M, N], P = softmax(S) row-wise,
O = P V, out = Q + O. Given dO = d out / d(loss) [M, C]:

    dV = P^T dO                                  [N, C]
    dP = dO V^T                                  [M, N]
    dS = P * (dP - delta),  delta = rowsum(dO * O)   (softmax Jacobian: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik),
                                                       and sum_k P_ik dP_ik = sum_c dO_ic O_ic)
    dQ = dO + scale * dS K                       (the residual passes dO straight through)
    dK = scale * dS^T Q

Every key block j (rows n of K, V) only needs its own columns of P and dS, and those need only
Q, dO (all M rows), the LSE and delta of each query row (saved by the forward), and K_j, V_j:

    P_j  = exp2(S_j * log2 e - lse)             dS_j = P_j * (dO V_j^T - delta)
    dV_j = P_j^T dO                              dK_j = scale * dS_j^T Q
    K is V (one tensor, one gradient):  dK_j + dV_j = [P_j ; scale dS_j]^T [dO ; Q]

With M = 64 queries that last product is a contraction over 2M = 128 rows: one key block's
gradient is finished while K_j is on chip, so it is written once and never accumulated across
programs. dQ = dO + scale * sum_j dS_j K_j sums over key blocks: every program accumulates its
key split's part in fp32 on chip (same chunks as the forward), writes one partial, and the host
sums the partials (like the forward's combine). So per key block K (= V) is read once, dK written
once, and P, dS never leave the chip (v1 wrote both to memory for C = 768).

In the dK/dV pass Q and dO (M x C) are read per key block when C is wide (from L2: 2 x 96 KiB at
C = 768); for narrow heads (one chunk <= 128 wide), and in the dQ-only / hybrid pass (no dK, dV
on chip), they are loaded once per program, so only the K (V) tiles are pipelined. More than BLOCK_M
queries: the host runs the kernel per query block and sums dK, dV in fp32 (exact: every query row
contributes its own term).
"""

import functools

import torch
import triton
import triton.language as tl

from hilt_kernels.hilt_v2 import _empty
from hilt_kernels.launch import (
    FusedConfig,
    dot_precision,
    fa2_num_splits,
    launch,
    num_sms,
    same_data,
    split_keys,
)
from hilt_kernels.split_combine import LOG2E


def _bwd_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, DQp, PDS,  # Lse, Delta [BH, M]; DK, DV [BH, N, D]; DQp [S, BH, M, D] fp32
    qk_scale, scale, M_Q, N_K, H, keys_per_split,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    HEAD_DIM: tl.constexpr, SAME_KV: tl.constexpr, SUM_KV: tl.constexpr, WRITE_KV: tl.constexpr,
    WRITE_DQ: tl.constexpr, WRITE_PDS: tl.constexpr, NC: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One key split x one query block, all of C: dK, dV of its key blocks and/or its dQ partial.

    WRITE_KV needs all queries in the block (grid axis 0 of size 1); WRITE_DQ alone takes any
    number of query blocks. WRITE_PDS (the hybrid backward) also stores P and scale * dS of every
    (query, key) pair once, in the input dtype, to PDS [BH, 2, M, N]: dK, dV are then one GEMM.
    """
    pid_m = tl.program_id(0)  # fastest: the query blocks sharing a key range run together (L2)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M_Q
    offs_d = tl.arange(0, BLOCK_D)
    q_ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    do_ptr = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + offs_d[None, :] * skd
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + offs_d[None, :] * svd
    stats = pid_bh.to(tl.int64) * M_Q
    lse = tl.load(Lse + stats + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(Delta + stats + offs_m, mask=mask_m, other=0.0)

    md0 = offs_d < HEAD_DIM
    mq0 = mask_m[:, None] & md0[None, :]
    dq0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if NC > 1:
        md1 = offs_d + BLOCK_D < HEAD_DIM
        mq1 = mask_m[:, None] & md1[None, :]
        dq1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if NC > 2:
        md2 = offs_d + 2 * BLOCK_D < HEAD_DIM
        mq2 = mask_m[:, None] & md2[None, :]
        dq2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if NC > 3:
        md3 = offs_d + 3 * BLOCK_D < HEAD_DIM
        mq3 = mask_m[:, None] & md3[None, :]
        dq3 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if RESIDENT:  # Q and dO loaded once, on chip for the whole key loop (narrow, or no dK/dV)
        q0 = tl.load(q_ptr, mask=mq0, other=0.0)
        do0 = tl.load(do_ptr, mask=mq0, other=0.0)
        if NC > 1:
            q1 = tl.load(q_ptr + BLOCK_D * sqd, mask=mq1, other=0.0)
            do1 = tl.load(do_ptr + BLOCK_D * sdd, mask=mq1, other=0.0)
        if NC > 2:
            q2 = tl.load(q_ptr + 2 * BLOCK_D * sqd, mask=mq2, other=0.0)
            do2 = tl.load(do_ptr + 2 * BLOCK_D * sdd, mask=mq2, other=0.0)
        if NC > 3:
            q3 = tl.load(q_ptr + 3 * BLOCK_D * sqd, mask=mq3, other=0.0)
            do3 = tl.load(do_ptr + 3 * BLOCK_D * sdd, mask=mq3, other=0.0)

    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, N_K)
    for start_n in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k_ptr = k_base + offs_n[:, None] * skn
        v_ptr = v_base + offs_n[:, None] * svn
        # S = Q K_j^T and dP = dO V_j^T over the C chunks; K_j (= V_j) chunks stay on chip.
        k0 = tl.load(k_ptr, mask=mask_n[:, None] & md0[None, :], other=0.0)
        if SAME_KV:
            v0 = k0
        else:
            v0 = tl.load(v_ptr, mask=mask_n[:, None] & md0[None, :], other=0.0)
        if not RESIDENT:
            q0 = tl.load(q_ptr, mask=mq0, other=0.0)
            do0 = tl.load(do_ptr, mask=mq0, other=0.0)
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
        if NC > 1:
            k1 = tl.load(k_ptr + BLOCK_D * skd, mask=mask_n[:, None] & md1[None, :], other=0.0)
            if SAME_KV:
                v1 = k1
            else:
                v1 = tl.load(v_ptr + BLOCK_D * svd, mask=mask_n[:, None] & md1[None, :], other=0.0)
            if not RESIDENT:
                q1 = tl.load(q_ptr + BLOCK_D * sqd, mask=mq1, other=0.0)
                do1 = tl.load(do_ptr + BLOCK_D * sdd, mask=mq1, other=0.0)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PRECISION)
        if NC > 2:
            k2 = tl.load(k_ptr + 2 * BLOCK_D * skd, mask=mask_n[:, None] & md2[None, :], other=0.0)
            if SAME_KV:
                v2 = k2
            else:
                v2 = tl.load(v_ptr + 2 * BLOCK_D * svd, mask=mask_n[:, None] & md2[None, :], other=0.0)
            if not RESIDENT:
                q2 = tl.load(q_ptr + 2 * BLOCK_D * sqd, mask=mq2, other=0.0)
                do2 = tl.load(do_ptr + 2 * BLOCK_D * sdd, mask=mq2, other=0.0)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=PRECISION)
        if NC > 3:
            k3 = tl.load(k_ptr + 3 * BLOCK_D * skd, mask=mask_n[:, None] & md3[None, :], other=0.0)
            if SAME_KV:
                v3 = k3
            else:
                v3 = tl.load(v_ptr + 3 * BLOCK_D * svd, mask=mask_n[:, None] & md3[None, :], other=0.0)
            if not RESIDENT:
                q3 = tl.load(q_ptr + 3 * BLOCK_D * sqd, mask=mq3, other=0.0)
                do3 = tl.load(do_ptr + 3 * BLOCK_D * sdd, mask=mq3, other=0.0)
            s = tl.dot(q3, tl.trans(k3), s, input_precision=PRECISION)
            dp = tl.dot(do3, tl.trans(v3), dp, input_precision=PRECISION)

        valid = mask_m[:, None] & mask_n[None, :]
        p = tl.where(valid, tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None]) * scale  # scale folded in: dS here is scale * dS
        p_lo = p.to(k0.dtype)
        ds_lo = ds.to(k0.dtype)
        if WRITE_PDS:  # [P; scale dS] of this key block, written once
            pds_ptr = PDS + (pid_bh.to(tl.int64) * 2 * M_Q + offs_m)[:, None] * N_K + offs_n[None, :]
            tl.store(pds_ptr, p_lo.to(PDS.dtype.element_ty), mask=valid)
            tl.store(pds_ptr + M_Q * N_K, ds_lo.to(PDS.dtype.element_ty), mask=valid)
        p_t = tl.trans(p_lo)
        ds_t = tl.trans(ds_lo)

        # dQ partial += scale dS_j K_j (chunk c); dK_j, dV_j of chunk c written now, never summed.
        if WRITE_DQ:
            dq0 = tl.dot(ds_lo, k0, dq0, input_precision=PRECISION)
        out = (pid_bh.to(tl.int64) * N_K + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
        if WRITE_KV:
            mo0 = mask_n[:, None] & md0[None, :]
            if not RESIDENT:  # reloaded (L1 / L2) rather than kept live across the softmax
                q0 = tl.load(q_ptr, mask=mq0, other=0.0)
                do0 = tl.load(do_ptr, mask=mq0, other=0.0)
            g0 = tl.dot(ds_t, q0, input_precision=PRECISION)
            if SUM_KV:  # [P; scale dS]^T [dO; Q]: the one gradient of K = V
                tl.store(
                    DK + out,
                    tl.dot(p_t, do0, g0, input_precision=PRECISION).to(DK.dtype.element_ty),
                    mask=mo0,
                )
            else:
                tl.store(DK + out, g0.to(DK.dtype.element_ty), mask=mo0)
                tl.store(
                    DV + out, tl.dot(p_t, do0, input_precision=PRECISION).to(DV.dtype.element_ty), mask=mo0
                )
        if NC > 1:
            if WRITE_DQ:
                dq1 = tl.dot(ds_lo, k1, dq1, input_precision=PRECISION)
            if WRITE_KV:
                mo1 = mask_n[:, None] & md1[None, :]
                q1 = tl.load(q_ptr + BLOCK_D * sqd, mask=mq1, other=0.0)
                do1 = tl.load(do_ptr + BLOCK_D * sdd, mask=mq1, other=0.0)
                g1 = tl.dot(ds_t, q1, input_precision=PRECISION)
                if SUM_KV:
                    g1 = tl.dot(p_t, do1, g1, input_precision=PRECISION)
                    tl.store(DK + out + BLOCK_D, g1.to(DK.dtype.element_ty), mask=mo1)
                else:
                    tl.store(DK + out + BLOCK_D, g1.to(DK.dtype.element_ty), mask=mo1)
                    g1 = tl.dot(p_t, do1, input_precision=PRECISION)
                    tl.store(DV + out + BLOCK_D, g1.to(DV.dtype.element_ty), mask=mo1)
        if NC > 2:
            if WRITE_DQ:
                dq2 = tl.dot(ds_lo, k2, dq2, input_precision=PRECISION)
            if WRITE_KV:
                mo2 = mask_n[:, None] & md2[None, :]
                q2 = tl.load(q_ptr + 2 * BLOCK_D * sqd, mask=mq2, other=0.0)
                do2 = tl.load(do_ptr + 2 * BLOCK_D * sdd, mask=mq2, other=0.0)
                g2 = tl.dot(ds_t, q2, input_precision=PRECISION)
                if SUM_KV:
                    g2 = tl.dot(p_t, do2, g2, input_precision=PRECISION)
                    tl.store(DK + out + 2 * BLOCK_D, g2.to(DK.dtype.element_ty), mask=mo2)
                else:
                    tl.store(DK + out + 2 * BLOCK_D, g2.to(DK.dtype.element_ty), mask=mo2)
                    g2 = tl.dot(p_t, do2, input_precision=PRECISION)
                    tl.store(DV + out + 2 * BLOCK_D, g2.to(DV.dtype.element_ty), mask=mo2)
        if NC > 3:
            if WRITE_DQ:
                dq3 = tl.dot(ds_lo, k3, dq3, input_precision=PRECISION)
            if WRITE_KV:
                mo3 = mask_n[:, None] & md3[None, :]
                q3 = tl.load(q_ptr + 3 * BLOCK_D * sqd, mask=mq3, other=0.0)
                do3 = tl.load(do_ptr + 3 * BLOCK_D * sdd, mask=mq3, other=0.0)
                g3 = tl.dot(ds_t, q3, input_precision=PRECISION)
                if SUM_KV:
                    g3 = tl.dot(p_t, do3, g3, input_precision=PRECISION)
                    tl.store(DK + out + 3 * BLOCK_D, g3.to(DK.dtype.element_ty), mask=mo3)
                else:
                    tl.store(DK + out + 3 * BLOCK_D, g3.to(DK.dtype.element_ty), mask=mo3)
                    g3 = tl.dot(p_t, do3, input_precision=PRECISION)
                    tl.store(DV + out + 3 * BLOCK_D, g3.to(DV.dtype.element_ty), mask=mo3)

    if WRITE_DQ:
        row = (pid_s * tl.num_programs(2) + pid_bh).to(tl.int64) * M_Q
        dq_ptr = DQp + (row + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(dq_ptr, dq0, mask=mq0)
        if NC > 1:
            tl.store(dq_ptr + BLOCK_D, dq1, mask=mq1)
        if NC > 2:
            tl.store(dq_ptr + 2 * BLOCK_D, dq2, mask=mq2)
        if NC > 3:
            tl.store(dq_ptr + 3 * BLOCK_D, dq3, mask=mq3)


def dq_from_parts(do: torch.Tensor, dq_attn: torch.Tensor) -> torch.Tensor:
    """dQ = dO + the attention term (fp32, summed over key splits), in the input dtype. A function
    of its own so that tests can read the fp32 attention term, which bf16 rounding of dQ hides."""
    return (do.float() + dq_attn).to(do.dtype)


@functools.lru_cache(maxsize=1024)
def _splits(cfg: FusedConfig, programs: int, n: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys_per_split): FA2 heuristic unless the config fixes the backward split; cached."""
    want = cfg.bwd_num_splits or fa2_num_splits(
        programs, num_sms(device) * cfg.programs_per_sm, triton.cdiv(n, block_n)
    )
    return split_keys(n, block_n, want)


def _launch_bwd(q, k, v, do, lse, delta, dk, dv, dq_part, scale, cfg, *, grid, keys_per_split, write_kv,
                write_dq, sum_kv, block_m, block_n, num_warps, num_stages, pds=None):  # fmt: skip
    d = q.shape[-1]
    nc = cfg.chunks(d)
    launch(
        _bwd_kernel,
        grid,
        q, k, v, do, lse, delta, dk, dv, dq_part, dq_part if pds is None else pds,
        scale * LOG2E, scale, q.shape[2], k.shape[2], q.shape[1], keys_per_split,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        HEAD_DIM=d, SAME_KV=same_data(k, v), SUM_KV=sum_kv, WRITE_KV=write_kv, WRITE_DQ=write_dq,
        WRITE_PDS=pds is not None, NC=nc, RESIDENT=(nc == 1 and cfg.block_d <= 128) or not write_kv,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg.block_d,
        NUM_STAGES=num_stages, PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def backward(q, k, v, dout, o_attn, lse, scale, cfg: FusedConfig, needs_input_grad):
    """(dq, dk, dv) on [B, H, M, D]; ``v is None`` means K is V and dk holds dK + dV (dv None).

    ``cfg.bwd_hybrid`` (the wide-head GPU default): ``_hybrid``, one pass writing P, scale dS and
    the dQ partials, then dK (+ dV) by one GEMM. ``cfg.bwd_fused_dq``: one pass (dQ accumulated on
    chip beside dK, dV; K read once; narrow heads). Otherwise a dK/dV pass, then a dQ-only pass
    over the keys with forward-sized query blocks.
    """
    aliased = v is None
    v_eff = k if aliased else v
    bsz, heads, m, d = q.shape
    n = k.shape[2]
    bh = bsz * heads
    delta = (dout.float() * o_attn).sum(-1)  # rowsum(dO * O), [B, H, M]
    do = dout.to(q.dtype)
    want_q = needs_input_grad[0]
    want_k = needs_input_grad[1]
    want_v = not aliased and needs_input_grad[2]
    write_kv = want_k or want_v
    fused_dq = cfg.bwd_fused_dq and want_q and write_kv  # no dK, dV wanted: the dQ-only pass
    kv_block_m = min(cfg.kv_block_m, triton.next_power_of_2(max(m, 16)))
    dk = dv = None
    if cfg.bwd_hybrid and write_kv:
        return _hybrid(q, k, v_eff, do, lse, delta, scale, cfg, aliased, want_q, want_k, want_v)
    dq_acc = torch.zeros((bsz, heads, m, d), dtype=torch.float32, device=q.device) if fused_dq else None
    if write_kv:  # dK, dV need every query of a key block in one program: query chunks on the host
        splits, per = _splits(cfg, bh, n, cfg.bwd_block_n, q.device)
        n_chunks = triton.cdiv(m, kv_block_m)
        kv_dtype = q.dtype if n_chunks == 1 else torch.float32  # several chunks: sum in fp32
        for m0 in range(0, m, kv_block_m):
            m1 = min(m, m0 + kv_block_m)
            dk_c = _empty((bsz, heads, n, d), kv_dtype, q.device)
            dv_c = dk_c if aliased else _empty((bsz, heads, n, d), kv_dtype, q.device)
            dq_part = _empty((splits, bh, m1 - m0, d), torch.float32, q.device) if fused_dq else dk_c
            _launch_bwd(
                q[:, :, m0:m1], k, v_eff, do[:, :, m0:m1], lse[:, :, m0:m1].contiguous(),
                delta[:, :, m0:m1].contiguous(), dk_c, dv_c, dq_part, scale, cfg,
                grid=(1, splits, bh), keys_per_split=per, write_kv=True, write_dq=fused_dq, sum_kv=aliased,
                block_m=kv_block_m, block_n=cfg.bwd_block_n, num_warps=cfg.bwd_num_warps,
                num_stages=cfg.bwd_num_stages,
            )  # fmt: skip
            if fused_dq:
                dq_acc[:, :, m0:m1] = dq_part.sum(0).view(bsz, heads, m1 - m0, d)
            dk = dk_c if dk is None else dk + dk_c
            if not aliased:
                dv = dv_c if dv is None else dv + dv_c
        dk, dv = dk.to(q.dtype), None if dv is None else dv.to(q.dtype)
    if want_q and not fused_dq:  # dQ alone: any query blocks, forward-like tiles
        n_m = triton.cdiv(m, cfg.block_m)
        splits, per = _splits(cfg, bh * n_m, n, cfg.block_n, q.device)
        dq_part = _empty((splits, bh, m, d), torch.float32, q.device)
        _launch_bwd(
            q, k, v_eff, do, lse, delta, dq_part, dq_part, dq_part, scale, cfg,
            grid=(n_m, splits, bh), keys_per_split=per, write_kv=False, write_dq=True, sum_kv=False,
            block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        dq_acc = dq_part.sum(0).view(bsz, heads, m, d)
    dq = dq_from_parts(do, dq_acc) if want_q else None
    return dq, dk if want_k else None, dv if want_v else None


def _hybrid(q, k, v, do, lse, delta, scale, cfg: FusedConfig, aliased, want_q, want_k, want_v):
    """Hybrid backward: one pass over the keys (forward-sized tiles, any number of query blocks)
    writes the dQ partials and [P; scale dS] once in the input dtype; dK (+ dV) is one batched GEMM
    over the 2M rows: K is V: dK = [P; scale dS]^T [dO; Q]; else dV = P^T dO, dK = (scale dS)^T Q.
    Moves 2 x M x N elements out and back instead of re-reading Q and dO for every key block."""
    bsz, heads, m, d = q.shape
    n = k.shape[2]
    bh = bsz * heads
    n_m = triton.cdiv(m, cfg.block_m)
    splits, per = _splits(cfg, bh * n_m, n, cfg.block_n, q.device)
    dq_part = _empty((splits, bh, m, d), torch.float32, q.device)
    pds = _empty((bh, 2, m, n), q.dtype, q.device)
    _launch_bwd(
        q, k, v, do, lse, delta, dq_part, dq_part, dq_part, scale, cfg,
        grid=(n_m, splits, bh), keys_per_split=per, write_kv=False, write_dq=True, sum_kv=False,
        block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        pds=pds,
    )  # fmt: skip
    dq = dq_from_parts(do, dq_part.sum(0).view(bsz, heads, m, d)) if want_q else None
    rows = torch.cat([do, q], dim=2).reshape(bh, 2 * m, d)  # [dO; Q], matching [P; scale dS]
    if aliased:
        dk = torch.bmm(pds.view(bh, 2 * m, n).transpose(1, 2), rows).view(bsz, heads, n, d)
        return dq, dk if want_k else None, None
    dv = torch.bmm(pds[:, 0].transpose(1, 2), rows[:, :m]).view(bsz, heads, n, d) if want_v else None
    dk = torch.bmm(pds[:, 1].transpose(1, 2), rows[:, m:]).view(bsz, heads, n, d) if want_k else None
    return dq, dk, dv
