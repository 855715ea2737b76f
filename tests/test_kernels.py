"""Fused HILT attention vs the float64 eager reference: forward and backward, odd shapes, K is V.

Both kernels are tested: v2 (``kernels/hilt_v2*.py``, the default) and v1 (``hilt_v1.py``, kept
until v2 has run on a GPU). Without CUDA the kernels run in the Triton interpreter (fp32 / fp16
only: the interpreter returns garbage for bf16 dots); TRITON_INTERPRET is set per test, so other
test modules do not inherit it. Every kernel output buffer is filled with NaN before launch, so an
element a kernel forgets to write fails the comparison. bf16 cases are GPU-marked and skip
without CUDA.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hilt_kernels
from hilt_kernels.reference import hilt_attention_reference

ka = importlib.import_module("hilt_kernels.hilt_v1")
kv2 = importlib.import_module("hilt_kernels.hilt_v2")
launch = importlib.import_module("hilt_kernels.launch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def interpreter_without_cuda(monkeypatch):
    """No CUDA: run the kernels in Triton's interpreter (read at launch), for these tests only."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN, so unwritten elements cannot pass."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ka, "_empty", poisoned)
    monkeypatch.setattr(kv2, "_empty", poisoned)
    monkeypatch.setattr(importlib.import_module("hilt_kernels.hilt_v2_bwd"), "_empty", poisoned)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error over max abs reference value (NaN anywhere gives NaN, which fails)."""
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def make_inputs(shape_q, n, dtype, kv_same, seed, transposed=False):
    """Fresh random q, k, v (leaf tensors needing grad); v is k when kv_same."""
    gen = torch.Generator().manual_seed(seed)
    shape_k = (*shape_q[:-2], n, shape_q[-1])

    def rand(shape):
        if transposed:  # build [B, N, H, d] and view it as [B, H, N, d] (non-contiguous strides)
            b, h, rows, d = shape
            t = torch.randn(b, rows, h, d, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
            return t.detach().requires_grad_()
        return torch.randn(shape, generator=gen).to(dtype).to(DEVICE).requires_grad_()

    q, k = rand(shape_q), rand(shape_k)
    v = k if kv_same else rand(shape_k)
    return q, k, v


def check_against_reference(q, k, v, scale, tol, config=None, impl="v2"):
    """Run kernel and fp64 reference forward + backward with one upstream gradient; compare all."""
    kv_same = k is v
    out = hilt_kernels.hilt_attention(q, k, v, scale=scale, config=config, impl=impl)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(out.dtype).to(DEVICE)
    out.backward(grad_out)

    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    v64 = k64 if kv_same else v.detach().double().requires_grad_()
    want = hilt_attention_reference(q64, k64, v64, scale=scale)
    want.backward(grad_out.double())

    assert out.shape == q.shape and out.dtype == q.dtype
    errors = {"out": rel_err(out, want), "dq": rel_err(q.grad, q64.grad), "dk": rel_err(k.grad, k64.grad)}
    if not kv_same:
        errors["dv"] = rel_err(v.grad, v64.grad)
    assert all(e <= tol for e in errors.values()), errors


@pytest.mark.parametrize(
    "shape_q, n, dtype, kv_same, scale",
    [
        ((2, 7, 200), 4097, torch.float32, True, None),  # the odd shape, paper form K is V
        ((2, 7, 200), 1000, torch.float32, False, 1.0),  # paper's literal formula (no 1/sqrt(C))
        ((1, 1, 96), 50, torch.float32, False, None),  # a single query
        ((2, 9, 128), 333, torch.float16, True, None),
        ((2, 3, 5, 64), 257, torch.float16, False, None),  # multi-head
        ((1, 2, 33, 48), 130, torch.float32, True, 0.5),
        ((2, 1, 64), 70, torch.float32, True, None),  # N' = 1, [B, H, N', d]
    ],
)
@pytest.mark.parametrize("impl", ["v2", "v1"])
def test_matches_fp64_reference(shape_q, n, dtype, kv_same, scale, impl):
    q, k, v = make_inputs(shape_q, n, dtype, kv_same, seed=n)
    check_against_reference(q, k, v, scale, TOL[dtype], impl=impl)


V2_SMALL = dict(block_m=16, block_n=32, block_d=64, num_splits=3, bwd_block_n=32, bwd_num_splits=2)


@pytest.mark.parametrize("kv_same", [True, False], ids=["k-is-v", "k-v"])
@pytest.mark.parametrize(
    "width, change",
    [
        (200, {}),  # 4 C chunks of 64 (ragged last), fused dQ, one dK/dV query chunk of 32
        (200, dict(bwd_fused_dq=False)),  # the wide GPU path: dK/dV pass, then a dQ-only pass
        (200, dict(kv_block_m=16)),  # 2 host query chunks for dK/dV, summed in fp32
        (48, dict(block_d=64, bwd_fused_dq=False, kv_block_m=16)),  # narrow: Q, dO resident
    ],
    ids=["wide-fused", "wide-two-pass", "wide-kv-chunks", "narrow-two-pass-chunks"],
)
def test_v2_small_tiles_chunks_splits(kv_same, width, change):
    """Explicit small v2 tiles: 2 query blocks, 3 / 2 key splits, every C-chunk count and path."""
    cfg = launch.FusedConfig(**{**V2_SMALL, **change})
    q, k, v = make_inputs((2, 20, width), 301, torch.float32, kv_same, seed=7)
    check_against_reference(q, k, v, None, TOL[torch.float32], config=cfg)


def test_v2_fp16_multi_head_two_pass():
    """fp16 [B, H, N', d] through the two-pass backward with a few splits (low-precision casts)."""
    cfg = launch.FusedConfig(**{**V2_SMALL, "block_d": 32, "bwd_fused_dq": False})
    q, k, v = make_inputs((1, 2, 9, 32), 97, torch.float16, False, seed=21)
    check_against_reference(q, k, v, None, TOL[torch.float16], config=cfg)


@pytest.mark.parametrize("kv_same", [True, False])
@pytest.mark.parametrize("width", [200, 48], ids=["wide-P-dS-backward", "narrow-fused-backward"])
def test_v1_small_tiles_many_blocks_and_splits(kv_same, width):
    """Explicit small tiles: 2 query blocks, 3 key splits, ragged C chunks / column blocks (wide)."""
    cfg = ka.KernelConfig(
        block_m=16,
        block_n=32,
        block_dk=64,
        block_dv=64,
        num_splits=3,
        bwd_block_m=16,
        bwd_block_n=32,
        bwd_block_dk=32,
    )
    q, k, v = make_inputs((2, 20, width), 301, torch.float32, kv_same, seed=7)
    check_against_reference(q, k, v, None, TOL[torch.float32], config=cfg, impl="v1")


@pytest.mark.parametrize("impl", ["v2", "v1"])
def test_non_contiguous_multi_head(impl):
    """[B, N, H, d] storage viewed as [B, H, N, d]: the kernels follow strides, not layout."""
    q, k, v = make_inputs((2, 3, 6, 32), 70, torch.float32, False, seed=3, transposed=True)
    assert not q.is_contiguous()
    check_against_reference(q, k, v, None, TOL[torch.float32], impl=impl)


@pytest.mark.parametrize("impl", ["v2", "v1"])
def test_aliased_k_v_get_one_summed_gradient(impl):
    """k is v: the single tensor's gradient is dK + dV of the reference with separate copies."""
    q, kv, _ = make_inputs((1, 4, 80), 90, torch.float32, True, seed=11)
    hilt_kernels.hilt_attention(q, kv, kv, impl=impl).sum().backward()

    q64 = q.detach().double()
    k64 = kv.detach().double().requires_grad_()
    v64 = kv.detach().double().requires_grad_()
    hilt_attention_reference(q64, k64, v64).sum().backward()
    assert rel_err(kv.grad, k64.grad + v64.grad) <= 1e-4
    assert rel_err(kv.grad, k64.grad) > 1e-2  # the dV part really is in there


@pytest.mark.parametrize("impl", ["v2", "v1"])
def test_same_data_distinct_views_get_separate_gradients(impl):
    """v a different view of k's storage: read once in the kernels, but two autograd inputs."""
    q, k, _ = make_inputs((1, 4, 64), 70, torch.float32, True, seed=5)
    base = k.detach().clone().requires_grad_()
    k_view, v_view = base[:], base[:]
    assert k_view is not v_view and ka.same_data(k_view, v_view)
    hilt_kernels.hilt_attention(q, k_view, v_view, impl=impl).sum().backward()

    k64 = base.detach().double().requires_grad_()
    hilt_attention_reference(q.detach().double(), k64, k64).sum().backward()
    assert rel_err(base.grad, k64.grad) <= 1e-4


@pytest.mark.parametrize("impl", ["v2", "v1"])
def test_frozen_keys_get_no_gradient(impl):
    """Only q needs a gradient (e.g. a frozen encoder's keys): dq is right, k and v get none."""
    q, k, v = make_inputs((1, 5, 64), 40, torch.float32, False, seed=13)
    k.requires_grad_(False)
    v.requires_grad_(False)
    hilt_kernels.hilt_attention(q, k, v, impl=impl).square().sum().backward()
    q64 = q.detach().double().requires_grad_()
    hilt_attention_reference(q64, k.double(), v.double()).square().sum().backward()
    assert k.grad is None and v.grad is None
    assert rel_err(q.grad, q64.grad) <= 1e-4


def test_impl_selection(monkeypatch):
    """v2 by default, v1 by argument or HILT_KERNEL_IMPL; both give the same answer."""
    q, k, _ = make_inputs((1, 3, 32), 40, torch.float32, True, seed=2)
    calls = []
    for name, fn in (("v1", ka._HiltAttention), ("v2", kv2._HiltAttentionV2)):
        apply = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, name=name, apply=apply: calls.append(name) or apply(*a))
    assert hilt_kernels.triton_available() and hilt_kernels.default_impl() == "v2"
    out2 = hilt_kernels.hilt_attention(q, k, k)
    monkeypatch.setenv("HILT_KERNEL_IMPL", "v1")
    out1 = hilt_kernels.hilt_attention(q, k, k)
    assert calls == ["v2", "v1"]
    assert rel_err(out2, out1.detach().double()) <= 1e-5
    with pytest.raises(ValueError, match="impl"):
        hilt_kernels.hilt_attention(q, k, k, impl="v3")


def test_import_without_triton():
    """The model imports the reference on machines without triton: ``import hilt_kernels`` must not need it."""
    script = (
        "import sys\n"
        "sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import hilt_kernels\n"
        "from hilt_kernels.reference import hilt_attention_reference\n"
        "import torch\n"
        "q = torch.randn(1, 3, 8, dtype=torch.float64)\n"
        "assert hilt_kernels.hilt_attention_reference is hilt_attention_reference\n"
        "assert hilt_attention_reference(q, q, q).shape == q.shape\n"
        "assert hilt_kernels.triton_available() is False\n"
        "assert 'triton' not in sys.modules or sys.modules['triton'] is None\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize(
    "k_shape, v_shape, q_dtype, match",
    [
        ((1, 9, 32), (1, 9, 16), torch.float32, "v shape"),
        ((2, 9, 32), (2, 9, 32), torch.float32, "k shape"),
        ((1, 9, 32), (1, 8, 32), torch.float32, "differ"),
        ((1, 9, 32), (1, 9, 32), torch.float64, "dtype"),
    ],
)
@pytest.mark.parametrize("impl", ["v2", "v1"])
def test_bad_input_is_named(k_shape, v_shape, q_dtype, match, impl):
    q = torch.randn(1, 4, 32, dtype=q_dtype, device=DEVICE)
    k = torch.randn(k_shape, dtype=q_dtype, device=DEVICE)
    v = torch.randn(v_shape, dtype=q_dtype, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        hilt_kernels.hilt_attention(q, k, v, impl=impl)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path without the interpreter")
def test_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not hilt_kernels.triton_available()
    x = torch.randn(1, 4, 32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        hilt_kernels.hilt_attention(x, x, x)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 kernels need CUDA (interpreter bf16 is broken)"
)
@pytest.mark.parametrize(
    "shape_q, n, kv_same, scale",
    [
        ((2, 64, 768), 4096, True, None),  # the paper's shape
        ((2, 64, 768), 4097, False, 1.0),
        ((2, 12, 64, 64), 32768, True, None),
        ((2, 64, 768), 32768, False, None),  # the target shape
        ((1, 511, 1024), 1000, False, None),
    ],
)
@pytest.mark.parametrize("impl", ["v2", "v1"])
def test_bf16_on_gpu(shape_q, n, kv_same, scale, impl):
    q, k, v = make_inputs(shape_q, n, torch.bfloat16, kv_same, seed=n)
    check_against_reference(q, k, v, scale, TOL[torch.bfloat16], impl=impl)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's leftover patches; CPU only")
@pytest.mark.parametrize("impl", ["v2", "v1"])
def test_interpreter_leaves_triton_language_as_found(impl):
    """A kernel that calls a @triton.jit helper left triton.language patched by the interpreter
    (a later compile in the process then failed); after a launch, forward and backward, every
    attribute is the object it was before."""
    import triton.language as tl

    objs = [tl, tl.standard, tl.math, tl.core, tl.core.tensor, tl.core.dtype, tl.core.tensor_descriptor_base]
    before = [(obj, dict(vars(obj))) for obj in objs]
    q, k, v = make_inputs((2, 5, 40), 70, torch.float32, False, seed=3)
    hilt_kernels.hilt_attention(q, k, v, impl=impl).sum().backward()
    changed = [
        f"{getattr(obj, '__name__', obj)}.{name}"
        for obj, saved in before
        for name, val in saved.items()
        if vars(obj).get(name) is not val
    ]
    assert not changed, changed[:10]


@pytest.mark.slow
def test_interpreter_works_when_triton_was_imported_first(tmp_path):
    """peft / bitsandbytes import triton before tests set TRITON_INTERPRET; kernels must still run."""
    script = (
        "import os, triton, torch\n"  # triton first, interpreter off
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from hilt_kernels import hilt_attention, hilt_attention_reference\n"
        "q, k = torch.randn(1, 3, 32), torch.randn(1, 40, 32)\n"
        "err = (hilt_attention(q, k, k) - hilt_attention_reference(q, k, k)).abs().max().item()\n"
        "assert err < 1e-5, err\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_bench_cpu_quick_writes_json(tmp_path, capsys):
    """The bench runs end to end on a CPU (interpreter), prints a table and a JSON line, writes JSON."""
    if torch.cuda.is_available():
        pytest.skip("the GPU bench is a benchmark, not a test")
    from hilt_kernels import bench

    payload = bench.main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "interpreter" in printed and json.loads(printed.strip().splitlines()[-1]) == payload
    assert json.loads((tmp_path / "kernel_bench_quick.json").read_text()) == payload
    assert "triton-v1" in (tmp_path / "kernel_bench_quick.txt").read_text()
    impls = {r["impl"] for r in payload["rows"]}
    assert impls == {"eager", "sdpa", "triton", "triton-v1"}
    assert bench.out_paths(str(tmp_path / "x.json"), "kernel_bench") == (
        str(tmp_path / "x.json"),
        str(tmp_path / "x.txt"),
    )
    assert payload["interpreter"] and payload["torch"] == torch.__version__
    triton_row = next(r for r in payload["rows"] if r["impl"] == "triton")
    assert triton_row["max_rel_err"] < 1e-4 and triton_row["max_rel_err_grad"] < 1e-4
    assert len(triton_row["fwd_ms"]) == 3 and triton_row["fwd_ms"][1] > 0
