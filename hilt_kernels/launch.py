"""How the HILT attention kernels are launched: tile choice, key split, GPU vs interpreter.

Kept apart from the kernels themselves (``hilt_attention.py``): this is the part to tune on a GPU
(``python -m hilt_kernels.bench --sweep``) and the part that knows Triton's interpreter quirks.
"""

import contextlib
import functools
import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

NARROW_HEAD = 128  # heads up to this width (padded) take the fused flash-style backward


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when the kernels can run here: CUDA present or the Triton interpreter switched on."""
    return torch.cuda.is_available() or interpreting()


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device); 4 stands in for the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.cache
def _compiled(fn, interpret: bool):
    """``triton.jit`` of a kernel, cached per interpreter mode (Triton reads the mode at wrap time)."""
    return triton.jit(fn)


def _patched_by_interpreter() -> list[object]:
    """The triton.language modules and classes whose attributes the interpreter replaces."""
    core = tl.core
    objs = [tl, tl.standard, tl.math, core, core.tensor, core.dtype, core.tensor_descriptor_base]
    condition = getattr(core, "condition", None)  # not in every triton version
    return objs if condition is None else [*objs, condition]


@contextlib.contextmanager
def _interpretable_stdlib():
    """Let the interpreter call tl.max / tl.sum / tl.zeros even if triton was imported earlier,
    and leave triton.language as it found it.

    Triton wraps its own library functions at import time; when something (peft, bitsandbytes,
    torch._dynamo) imported triton before TRITON_INTERPRET was set, those are compiled-mode
    objects that the interpreter refuses to call. For the launch, swap in interpreted twins.
    The interpreter itself patches triton.language for a launch and restores it, except for a
    ``@triton.jit`` function called from a kernel, whose patch it never undoes (triton 3.x,
    ``InterpretedFunction.__call__``); left in place, a later compile in the same process fails
    ("'value' object has no attribute 'dtype'"). Every attribute changed during the launch is
    put back (names it added, globals of its rewritten functions, stay).
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    before = [(obj, dict(vars(obj))) for obj in _patched_by_interpreter()]
    for mod in (tl, tl.standard, tl.math):
        for name, val in list(vars(mod).items()):
            if isinstance(val, JITFunction):
                setattr(mod, name, InterpretedFunction(val.fn))
    try:
        yield
    finally:
        for obj, saved in before:
            for name, val in list(vars(obj).items()):
                # Names the interpreter adds (its rewritten functions' globals) stay.
                if name in saved and saved[name] is not val:
                    setattr(obj, name, saved[name])


def launch(fn, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Launch a kernel, reading TRITON_INTERPRET now (not at import) to pick GPU or interpreter."""
    if not interpreting():
        _compiled(fn, False)[grid](*args, **kwargs)
        return
    with _interpretable_stdlib():
        _compiled(fn, True)[grid](*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Launch configuration: a small heuristic (no autotune, which needs a GPU for >1 config).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape; ``num_splits=None`` lets the heuristic pick the key split."""

    block_m: int
    block_n: int
    block_dk: int
    block_dv: int
    num_warps: int = 8
    num_stages: int = 2
    programs_per_sm: int = 2  # forward programs resident per SM, for sizing the key split
    num_splits: int | None = None
    bwd_block_m: int = 64  # the backward kernels' query tile, key tile and C chunk
    bwd_block_n: int = 64
    bwd_block_dk: int = 64
    bwd_num_stages: int = 2


def pow2(x: int) -> int:
    """Smallest power of two >= max(x, 16) (tl.dot needs every tile side >= 16)."""
    return max(16, 1 << (max(int(x), 1) - 1).bit_length())


def pick_config(m: int, n: int, d: int, dtype: torch.dtype, interpret: bool | None = None) -> KernelConfig:
    """Tile sizes for M queries, N keys, head width d.

    GPU choices were checked by compiling for sm_90 with triton 3.6 and 3.9 (``python -m
    hilt_kernels.bench --compile-only``): none spills registers. They are still to be tuned on a GPU
    (``hilt_kernels.bench --sweep``).
    """
    interpret = interpreting() if interpret is None else interpret
    d_pad = pow2(d)
    block_m = min(64, pow2(m))
    wide = d_pad > NARROW_HEAD
    if interpret:  # ~1 ms per program instance: few, large programs
        cfg = KernelConfig(block_m, block_n=64, block_dk=min(d_pad, 256), block_dv=min(d_pad, 256))
    elif dtype == torch.float32 and wide:  # 4-byte tiles: halve them to stay in registers
        cfg = KernelConfig(block_m, 32, 32, 128, programs_per_sm=1, bwd_block_n=32, bwd_block_dk=32)
    elif dtype == torch.float32:
        cfg = KernelConfig(block_m, 32, d_pad, d_pad, bwd_block_m=32, bwd_block_n=32, bwd_num_stages=1)
    elif wide:  # single head C=768: C chunks of 32 in q k^T, 256-wide output blocks (3 for C=768)
        cfg = KernelConfig(block_m, block_n=32, block_dk=32, block_dv=256, programs_per_sm=1)
    else:  # multi-head: the whole head in one tile, so K is read once when K is V
        cfg = KernelConfig(
            block_m, block_n=64, block_dk=d_pad, block_dv=d_pad, num_stages=3, bwd_num_stages=3
        )
    return replace(cfg, bwd_block_m=min(cfg.bwd_block_m, block_m))


def num_splits(cfg: KernelConfig, n: int, programs_per_split: int, device: torch.device) -> int:
    """Key splits so that the forward grid fills the GPU about once; capped by key blocks.

    More splits would add parallelism but also partial (m, l, acc) traffic: at C=768, 22 splits
    of fp32 partials are ~9% of the bytes of K itself.
    """
    if cfg.num_splits is not None:
        return max(1, min(cfg.num_splits, triton.cdiv(n, cfg.block_n)))
    if device.type == "cuda":
        target = cfg.programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(triton.cdiv(n, cfg.block_n), triton.cdiv(target, programs_per_split)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots (no tf32), so the fp32 error stays near 1e-6."""
    return "ieee" if dtype == torch.float32 else "tf32"


def same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors view the very same elements (then K is read once)."""
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


# ----------------------------------------------------------------------------------------------
# v2 (``hilt_v2.py``): one program owns all of C for a key split; the choices below.
# ----------------------------------------------------------------------------------------------

MAX_CHUNKS = 4  # the v2 kernels hold up to 4 C chunks (acc0..acc3): C <= 4 * 256 = 1024
SMEM_LIMIT = 232448  # sm_90 (H100 / H200): 227 KiB of shared memory per block at most
SMEM_MARGIN = 4096  # triton 3.6 (the GPU image's) allocates up to 2 KiB more than ``smem_bytes``


@dataclass(frozen=True)
class FusedConfig:
    """v2 tiles: BLOCK_D is the C chunk width (C = up to 4 chunks); splits None = heuristic."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int = 8
    num_stages: int = 2
    bwd_block_n: int = 32
    bwd_num_warps: int = 8
    bwd_num_stages: int = 2
    bwd_fused_dq: bool = True  # dQ on chip in the dK/dV pass (K read once); False: a second dQ pass
    kv_block_m: int = 64  # queries per dK/dV program (all of them, up to this; more: host chunks)
    programs_per_sm: int = 1  # resident programs per SM the split heuristic assumes
    num_splits: int | None = None
    bwd_num_splits: int | None = None
    # Hybrid backward (wide heads): one pass over the keys writes P and scale*dS once (input dtype)
    # and the dQ partials; dK (+ dV) is then one batched GEMM. Replaces the dK/dV pass.
    bwd_hybrid: bool = False

    def chunks(self, d: int) -> int:
        return triton.cdiv(d, self.block_d)


def _buffers(block_m: int, stages: int) -> int:
    """Shared-memory copies of a pipelined load: Triton keeps ``stages`` buffers when the dot runs
    on wgmma (64-row tiles) and ``stages - 1`` (at least 1) for mma.sync (seen in the TTGIR on
    sm_90, triton 3.9: C768 forward ``memdesc<1x64x256>`` at 2 stages, ``<2x32x256>`` at 3;
    12 x 64 forward ``<3x64x64>`` at 3)."""
    return stages if block_m >= 64 else max(stages - 1, 1)


def smem_bytes(kind: str, cfg: FusedConfig, d: int, elem: int, same_kv: bool, m: int = 64) -> int:
    """Shared memory one v2 pass needs on sm_90, from its tiles (the model behind ``fused_supported``).

    ``kind``: ``fwd`` (forward key loop), ``dq`` (dQ-only / hybrid P, dS pass: Q and dO on chip
    beside the K pipeline), ``kv`` (the dK/dV pass). Operands held in shared memory: the Q (and
    dO) chunks for the whole loop, ``_buffers`` copies of the K (and V) tile, and the P tile the
    second product reads. Equals the compiled ``shared`` of the wide forward and dQ / hybrid passes
    on triton 3.9 (``tests/test_kernel_compile.py``) and bounds the dK/dV and narrow passes from
    above; triton 3.6 compiled the C = 768 hybrid pass 2 KiB larger (hence ``SMEM_MARGIN``).
    """
    cp = cfg.chunks(d) * cfg.block_d  # C padded to whole chunks
    kv = 1 if same_kv else 2
    if kind in ("fwd", "dq"):
        bm, bn, stages = cfg.block_m, cfg.block_n, cfg.num_stages
        rows_on_chip = bm if kind == "fwd" else 2 * bm  # Q (+ dO)
        return elem * (rows_on_chip * cp + _buffers(bm, stages) * kv * bn * cp + bm * bn)
    if kind != "kv":
        raise ValueError(f"smem_bytes: unknown pass {kind!r}")
    bm, bn, stages = min(cfg.kv_block_m, pow2(m)), cfg.bwd_block_n, cfg.bwd_num_stages
    bufs = _buffers(bm, stages)
    if cfg.chunks(d) == 1 and cfg.block_d <= NARROW_HEAD:  # Q, dO resident; P^T, dS^T tiles
        return elem * (2 * bm * cp + bufs * kv * bn * cp + 2 * bm * bn)
    if stages == 1:  # Q, dO chunks reloaded per key block: a few chunk-sized tiles live at a time
        return elem * (4 * bm * cfg.block_d + 2 * kv * bn * cfg.block_d + 2 * bm * bn)
    # Pipelined reloads of Q and dO (loop-invariant addresses) are multi-buffered too.
    return elem * (bufs * (2 * bm * cp + kv * bn * cp) + 2 * bm * bn)


def passes(cfg: FusedConfig, d: int) -> tuple[str, ...]:
    """The v2 passes a training step with ``cfg`` launches (forward + backward), for ``smem_bytes``."""
    if cfg.bwd_hybrid:
        return ("fwd", "dq")
    return ("fwd", "kv") if cfg.bwd_fused_dq else ("fwd", "kv", "dq")


def config_fits(cfg: FusedConfig, d: int, dtype: torch.dtype, same_kv: bool, m: int = 64) -> bool:
    """Every pass of ``cfg`` fits the sm_90 shared-memory limit (with ``SMEM_MARGIN`` to spare) and C
    fits in ``MAX_CHUNKS`` chunks."""
    if cfg.chunks(d) > MAX_CHUNKS:
        return False
    elem = torch.empty((), dtype=dtype).element_size()
    return all(smem_bytes(k, cfg, d, elem, same_kv, m) + SMEM_MARGIN <= SMEM_LIMIT for k in passes(cfg, d))


def fused_supported(d: int, dtype: torch.dtype = torch.bfloat16, same_kv: bool = True, m: int = 64) -> bool:
    """v2 runs this head: some config ``pick_fused_config`` would try fits in shared memory (GPU)."""
    return pick_fused_config(m, 4096, d, dtype, interpret=False, same_kv=same_kv) is not None


def _wide_candidates(block_m: int, block_d: int, same_kv: bool, m: int, d: int) -> list[FusedConfig]:
    """Wide-head (bf16 / fp16) configs, best first: the first that fits is used.

    Forward: 32-row query blocks (mma.sync, 167 registers, no spills), 3 stages so that two K
    buffers alternate: the next key block's cp.async stays in flight while the current one is used
    (TTGIR ``async_wait {num = 3}`` in the loop; 2 stages compile to one buffer and
    ``async_wait {num = 0}``, no overlap). Backward: the hybrid when P and dS (2 x M x N) are
    smaller than K (C x N), else the two-pass dK/dV + dQ. Smaller key tiles follow for wider heads.
    """
    hybrid = 2 * m <= d
    first = 32 if same_kv else 16
    out = []
    for bn, stages in ((first, 3), (16, 3), (first, 2), (16, 2)):  # pipelined first
        out.append(
            FusedConfig(
                min(block_m, 32), bn, block_d, num_warps=8, num_stages=stages,
                bwd_block_n=16, bwd_num_warps=8, bwd_num_stages=1, bwd_fused_dq=False, bwd_hybrid=hybrid,
            )
        )  # fmt: skip
    return out


def pick_fused_config(
    m: int, n: int, d: int, dtype: torch.dtype, interpret: bool | None = None, same_kv: bool = True
) -> FusedConfig | None:
    """v2 tile choice, or None when no v2 config fits (the caller falls back to v1). Cached per
    shape (the interpreter flag is read here, outside the cache)."""
    return _pick_fused_config(m, d, dtype, interpreting() if interpret is None else interpret, same_kv)


@functools.lru_cache(maxsize=256)
def _pick_fused_config(
    m: int, d: int, dtype: torch.dtype, interpret: bool, same_kv: bool
) -> FusedConfig | None:
    """``pick_fused_config`` without the key count (no choice depends on it). GPU rows were checked only by compiling for sm_90 (``python -m hilt_kernels.bench
    --compile-only``: registers, spills, shared memory, the TTGIR's K buffers); to be tuned on a GPU.
    Separate K and V tiles double the shared memory per key block: half the key tile."""
    block_m = min(64, pow2(m))
    block_d = min(pow2(d), 256)
    if interpret:  # ~1 ms per program instance: few, large programs
        if pow2(d) > MAX_CHUNKS * 256:
            return None
        hybrid = pow2(d) > NARROW_HEAD and 2 * m <= d  # as on the GPU (``_wide_candidates``)
        return FusedConfig(
            block_m,
            64,
            block_d,
            num_warps=4,
            num_stages=1,
            bwd_block_n=64,
            bwd_num_stages=1,
            bwd_hybrid=hybrid,
        )
    wide = pow2(d) > NARROW_HEAD
    if dtype == torch.float32 and wide:  # 4-byte tiles (exact fp32 dots, no tensor cores): small tiles
        fp32 = dict(
            num_warps=8, num_stages=2, bwd_block_n=16, bwd_num_stages=1, bwd_fused_dq=False, kv_block_m=16
        )
        cands = [FusedConfig(min(block_m, 16), 16, block_d, **fp32)]
    elif dtype == torch.float32:
        cands = [FusedConfig(block_m, 32, block_d, 8, 3, bwd_block_n=16, bwd_num_warps=8)]
    elif wide:  # C = 768: three 256-wide chunks of Q, K (= V) and acc; see hilt_kernels/README.md
        cands = _wide_candidates(block_m, block_d, same_kv, m, d)
    else:  # bwd 3 stages: 3 K buffers, ``async_wait {num >= 1}`` (2 stages: 2 buffers, num = 0)
        narrow = dict(num_warps=4, num_stages=3, bwd_block_n=64, bwd_num_warps=4, bwd_num_stages=3)
        cands = [FusedConfig(block_m, 64, block_d, **narrow)]
    return next((c for c in cands if config_fits(c, d, dtype, same_kv, m)), None)


@functools.lru_cache(maxsize=1024)
def fa2_num_splits(programs: int, slots: int, key_blocks: int, max_splits: int = 128) -> int:
    """FlashAttention-2's split heuristic: the fewest key splits whose wave efficiency is within
    85 % of the best, so that ``programs * splits`` fills ``slots`` (SMs x programs per SM).

    ``programs`` is the grid without the split axis (B * H * query blocks)."""
    if programs >= 0.8 * slots:
        return 1
    top = max(1, min(max_splits, slots, key_blocks))
    eff = []
    for s in range(1, top + 1):
        waves = programs * s / slots
        eff.append(waves / math.ceil(waves))
    best = max(eff)
    return next(s for s, e in enumerate(eff, 1) if e >= 0.85 * best)


def split_keys(n: int, block_n: int, splits: int) -> tuple[int, int]:
    """(splits, keys_per_split) with keys_per_split a multiple of block_n and no empty split."""
    per = triton.cdiv(triton.cdiv(n, max(splits, 1)), block_n) * block_n
    return triton.cdiv(n, per), per
