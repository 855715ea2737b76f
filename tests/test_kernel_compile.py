"""The kernels compile for an H100 (sm_90) on a machine without a GPU, as the launchers call them.

The interpreter checks the arithmetic but not GPU code generation; this compiles the very launches
``kernels.hilt_attention`` would make for the paper's shapes in bf16 (Triton to PTX to cubin) and
checks, where triton ships ptxas, that no kernel spills registers.
"""

import importlib.util

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from kernels import bench

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile for real"),
    pytest.mark.skipif(
        importlib.util.find_spec("triton.backends.nvidia") is None, reason="triton without its CUDA backend"
    ),
    pytest.mark.skipif(
        not isinstance(tl.max, JITFunction),
        reason="triton was imported with TRITON_INTERPRET=1 set, its library cannot be compiled in this process",
    ),
]


@pytest.mark.parametrize(
    "shape",
    [
        bench.Shape(1, 0, 64, 4096, 768, True),  # the paper: one 768-wide head, K is V
        bench.Shape(1, 0, 64, 4096, 768, False),
        bench.Shape(1, 12, 64, 4096, 64, True),  # multi-head 12 x 64
        bench.Shape(1, 12, 64, 4096, 64, False),
    ],
    ids=lambda s: s.label(),
)
def test_bf16_launches_compile_for_sm90_without_spills(shape):
    calls = bench.capture_launches(shape, torch.bfloat16)
    backward = ["_bwd_dkdv_kernel", "_bwd_dq_kernel"] if shape.width <= 128 else ["_bwd_p_ds_kernel"]
    assert [fn.__name__ for fn, _, _ in calls] == ["_fwd_split_kernel", "_fwd_combine_kernel", *backward]
    for fn, args, kwargs in calls:
        kernel = bench.compile_launch(fn, args, kwargs, arch=90)
        assert kernel.asm["cubin"], fn.__name__
        usage = bench.ptxas_usage(kernel.asm["ptx"], arch=90)
        if usage["spill_bytes"] is not None:
            assert usage["spill_bytes"] == 0, (fn.__name__, usage)
