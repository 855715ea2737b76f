"""What both HILT kernels share: the split-K combine kernel and the input checks.

Each version's forward writes per-split partials (running max, sum, accumulator) for its key
splits; ``_fwd_combine_kernel`` merges them with their log-sum-exp weights and adds the residual q.
v2 (``hilt_v2.py``) and v1 (``hilt_v1.py``, kept until v2 has run on a GPU) both launch it.
"""

from __future__ import annotations

import torch
import triton.language as tl

from hilt_kernels.launch import interpreting

LOG2E = 1.4426950408889634
COMBINE_BLOCK_M = 16
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# A plain function, wrapped with ``triton.jit`` on first use (``hilt_kernels.launch.launch``), so that
# TRITON_INTERPRET is read at launch, not at import.
def _fwd_combine_kernel(
    Q, Acc, Mx, Lx, Out, OAttn, Lse,  # OAttn [BH, M, D] fp32; Lse [BH, M] fp32 (base 2)
    n_splits, M_Q, D, H,
    sqb, sqh, sqm, sqd,
    sob, soh, som, sod,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Merge the split partials with their log-sum-exp weights; write q + O, O and the LSE."""
    pid_md = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_d = tl.cdiv(D, BLOCK_D)
    pid_m = pid_md // n_d
    pid_d = pid_md % n_d
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M_Q
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = mask_m[:, None] & (offs_d[None, :] < D)
    n_bh = tl.num_programs(1)

    m_g = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        row = (s * n_bh + pid_bh).to(tl.int64) * M_Q
        m_g = tl.maximum(m_g, tl.load(Mx + row + offs_m, mask=mask_m, other=0.0))
    l_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_splits):
        row = (s * n_bh + pid_bh).to(tl.int64) * M_Q
        w = tl.math.exp2(tl.load(Mx + row + offs_m, mask=mask_m, other=0.0) - m_g)
        l_g += w * tl.load(Lx + row + offs_m, mask=mask_m, other=0.0)
        a = tl.load(Acc + (row + offs_m)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        o += w[:, None] * a
    l_g = tl.where(mask_m, l_g, 1.0)  # rows past M' hold no keys; keep them finite
    o = o / l_g[:, None]

    q = tl.load(
        Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    out_ptr = (
        Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    )
    tl.store(out_ptr, (q + o).to(Out.dtype.element_ty), mask=mask)
    base = pid_bh.to(tl.int64) * M_Q
    tl.store(OAttn + (base + offs_m)[:, None] * D + offs_d[None, :], o, mask=mask)
    if pid_d == 0:
        tl.store(Lse + base + offs_m, m_g + tl.math.log2(l_g), mask=mask_m)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a clear error for shapes, dtypes or devices the kernel does not take."""
    if q.dim() not in (3, 4):
        raise ValueError(f"hilt_attention: q must be [B, N', C] or [B, H, N', d], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != q.dim() or t.shape[:-2] != q.shape[:-2] or t.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"hilt_attention: {name} shape {tuple(t.shape)} does not match q {tuple(q.shape)} "
                "(same batch/heads and width, any key count)"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"hilt_attention: {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}"
            )
    if k.shape != v.shape:
        raise ValueError(f"hilt_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"hilt_attention: dtype {q.dtype} not supported; use one of {SUPPORTED_DTYPES}")
    if q.shape[-2] == 0 or k.shape[-2] == 0 or q.shape[-1] == 0:
        raise ValueError(f"hilt_attention: empty input q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "hilt_attention: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1)"
            " or use hilt_kernels.hilt_attention_reference / SDPA"
        )
