"""The kernels compile for an H100 (sm_90) on a machine without a GPU, as the JIT would compile them.

The interpreter checks the arithmetic but not GPU code generation; this compiles the very launches
``hilt_kernels.hilt_attention`` makes for the paper's shapes in bf16 (Triton to PTX to cubin) with the
JIT's own specialisation (``hilt_kernels.compile_report``), and checks the resources of what runs:
shared memory within the H100 limit, no register spills where none are expected, pipelined
``cp.async`` loads and ``wgmma`` where the design relies on them.
"""

import importlib.util

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from hilt_kernels import compile_report as cr
from hilt_kernels.bench import Shape

SMEM_LIMIT = 232448  # H100 / H200: 227 KiB of shared memory per block at most
SHAPES = [
    Shape(1, 0, 64, 4096, 768, True),  # the paper: one 768-wide head, K is V
    Shape(1, 0, 64, 4096, 768, False),
    Shape(1, 12, 64, 4096, 64, True),  # multi-head 12 x 64
    Shape(1, 12, 64, 4096, 64, False),
]

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("triton.backends.nvidia") is None, reason="triton without its CUDA backend"
    ),
    pytest.mark.skipif(
        not isinstance(tl.max, JITFunction),
        reason="triton was imported with TRITON_INTERPRET=1 set, its library cannot be compiled in this process",
    ),
]


def test_compile_uses_the_jit_specialisation():
    """Aligned contiguous tensors: 16-byte divisibility on every pointer, stride 1 a constant;
    a misaligned view loses the divisibility, as in ``JITFunction.run``."""
    fn, args, kwargs = cr.capture_launches(SHAPES[0], torch.bfloat16)[0]
    assert fn.__name__ == "_fwd_kernel"
    _, target, options, signature, constexprs, attrs = cr.jit_specialisation(fn, args, kwargs, 90)
    names = list(signature)
    assert (target.backend, target.arch) == ("cuda", 90) and options.num_warps == kwargs["num_warps"]
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            assert signature[name] in ("*bf16", "*fp32") and ["tt.divisibility", 16] in attrs[(i,)], name
        elif isinstance(value, int) and value == 1:
            assert signature[name] == "constexpr" and constexprs[(i,)] == 1, name
    assert signature["skd"] == signature["sqd"] == "constexpr"  # contiguous C: 16-byte vector loads

    q = args[0]
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)  # 2-byte offset
    _, _, _, signature, _, attrs = cr.jit_specialisation(fn, (shifted, *args[1:]), kwargs, 90)
    assert signature["Q"] == "*bf16" and ["tt.divisibility", 16] not in attrs.get((0,), [])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label())
def test_v2_bf16_launches_compile_for_sm90(shape):
    calls = cr.capture_launches(shape, torch.bfloat16, "v2")
    names = [fn.__name__ for fn, _, _ in calls]
    wide = shape.width > 128
    # Wide heads: the hybrid backward, one pass over the keys (P, scale dS, dQ partials) + a GEMM.
    assert names == ["_fwd_kernel", "_fwd_combine_kernel", "_bwd_kernel"]
    rows = [cr.kernel_row(fn, args, kwargs, 90, shape.label(), torch.bfloat16) for fn, args, kwargs in calls]
    for row in rows:
        assert row["shared_bytes"] <= SMEM_LIMIT, row  # launchable on an H100
        if row["spill_bytes"] is not None:
            assert row["spill_bytes"] == 0, row
    if wide:
        assert rows[2]["WRITE_PDS"] and not rows[2]["WRITE_KV"], rows[2]
    fwd = rows[0]
    assert fwd["cp_async"], fwd
    if not wide:  # 64-row tiles: Hopper tensor cores for every product
        assert all(r["wgmma"] for r in rows if r["kernel"] != "_fwd_combine_kernel"), rows
    text = cr.format_rows({"triton": "x", "arch": 90, "impl": "v2", "rows": rows})
    assert len(text.splitlines()) == len(rows) + 1 and "regs=" in text


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label())
def test_v2_key_loops_are_multi_buffered(shape):
    """The launcher's configs overlap loads with compute: the forward's and the backward's key
    loops keep >= 2 copies of the K tile in shared memory and wait for all but >= 1 cp.async
    group in the loop (2 stages on mma.sync compiled to one buffer and ``async_wait {num = 0}``)."""
    for fn, args, kwargs in cr.capture_launches(shape, torch.bfloat16, "v2"):
        if fn.__name__ == "_fwd_combine_kernel":
            continue
        kernel = cr.compile_like_jit(fn, args, kwargs, 90)
        pipe = cr.ttgir_pipeline(kernel.asm["ttgir"])
        assert pipe["pipeline_buffers"] >= 2 and pipe["async_wait_max"] >= 1, (fn.__name__, kwargs, pipe)


WIDTHS = [(768, True), (768, False), (1024, True), (1024, False), (512, True), (64, True), (64, False)]


@pytest.mark.parametrize("width, kv_same", WIDTHS)
def test_smem_model_matches_the_compiled_kernels(width, kv_same):
    """``launch.smem_bytes`` (what ``fused_supported`` decides from) is the compiled shared memory
    of the forward and dQ / hybrid passes (equal on triton 3.9, within ``SMEM_MARGIN`` on 3.6) and
    bounds the dK/dV pass from above; so every config the launcher picks launches on sm_90."""
    from hilt_kernels import launch

    heads = 0 if width > 128 else 12
    shape = Shape(1, heads, 64, 4096, width, kv_same)
    cfg = launch.pick_fused_config(64, 4096, width, torch.bfloat16, interpret=False, same_kv=kv_same)
    for fn, args, kwargs in cr.capture_launches(shape, torch.bfloat16, "v2"):
        kind = cr.pass_kind(fn.__name__, kwargs)
        if kind is None:
            continue
        compiled = cr.compile_like_jit(fn, args, kwargs, 90).metadata.shared
        model = launch.smem_bytes(kind, cfg, width, 2, kv_same)
        assert compiled <= SMEM_LIMIT, (kind, compiled)
        assert compiled <= model + launch.SMEM_MARGIN, (kind, compiled, model)  # what config_fits relies on
        if kind == "kv" or width <= 128:  # an upper bound (allocation reuse differs)
            assert model <= compiled + 16384, (kind, compiled, model)
        else:  # triton 3.9: equal; 3.6: the hybrid pass 2 KiB more
            assert model <= compiled, (kind, compiled, model)


@pytest.mark.parametrize("shape", SHAPES[::2], ids=lambda s: s.label())
def test_v1_bf16_launches_compile_for_sm90(shape):
    """v1 stays selectable until v2 has run on a GPU: it must still compile."""
    for fn, args, kwargs in cr.capture_launches(shape, torch.bfloat16, "v1"):
        row = cr.kernel_row(fn, args, kwargs, 90, shape.label(), torch.bfloat16)
        assert row["shared_bytes"] <= SMEM_LIMIT, row
