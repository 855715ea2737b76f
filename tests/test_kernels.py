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
kbwd = importlib.import_module("hilt_kernels.hilt_v2_bwd")
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
    """Relative Frobenius error ||got - want|| / ||want|| in float64 (NaN anywhere gives NaN, which fails)."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def rounding_floor(exact: torch.Tensor, residual: torch.Tensor, dtype: torch.dtype) -> float:
    """The attention-term error of a perfect kernel whose output ``residual + exact`` is rounded to
    ``dtype``: ||round(residual + exact) - residual - exact|| / ||exact||. Where the residual is
    large against the attention term (bf16, uniform softmax over many keys), this is what any
    kernel scores on ``out - q``; the kernel's own fp32 terms are then checked separately."""
    total = residual.double() + exact
    return rel_err(total.to(dtype).double() - residual.double(), exact)


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


class InternalTerms:
    """Records v2's fp32 attention terms: O from the combine, dQ's attention part before + dO."""

    def __init__(self, monkeypatch):
        self.o_attn, self.dq_attn = [], []
        forward, finish = kv2._forward, kbwd.dq_from_parts

        def spy_forward(*args, **kwargs):
            out, o_attn, lse = forward(*args, **kwargs)
            self.o_attn.append(o_attn)
            return out, o_attn, lse

        def spy_finish(do, dq_attn):
            self.dq_attn.append(dq_attn)
            return finish(do, dq_attn)

        monkeypatch.setattr(kv2, "_forward", spy_forward)
        monkeypatch.setattr(kbwd, "dq_from_parts", spy_finish)


def attention_errors(run, q, k, v, scale, grad_out) -> tuple[dict, dict]:
    """Attention-term errors of ``run(q, k, v)`` (forward + backward) against the fp64 reference,
    and the rounding floors of the residual terms: O = out - q, dQ - dO, dK, dV, each by relative
    Frobenius error, so a term the residual dwarfs still counts in full."""
    kv_same = k is v
    out = run(q, k, v)
    out.backward(grad_out)
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    v64 = k64 if kv_same else v.detach().double().requires_grad_()
    want = hilt_attention_reference(q64, k64, v64, scale=scale)
    want.backward(grad_out.double())
    o_ref = (want - q64).detach()
    dq_ref = q64.grad - grad_out.double()
    assert out.shape == q.shape and out.dtype == q.dtype
    errors = {
        "O": rel_err(out.detach().double() - q.detach().double(), o_ref),
        "dQ-dO": rel_err(q.grad.double() - grad_out.double(), dq_ref),
        "dK": rel_err(k.grad, k64.grad),
    }
    floors = {
        "O": rounding_floor(o_ref, q.detach(), q.dtype),
        "dQ-dO": rounding_floor(dq_ref, grad_out, q.dtype),
        "dK": 0.0,
    }
    if not kv_same:
        errors["dV"], floors["dV"] = rel_err(v.grad, v64.grad), 0.0
    return errors, {"o_ref": o_ref, "dq_ref": dq_ref, "floors": floors}


def check_against_reference(q, k, v, scale, tol, config=None, impl="v2", terms=None):
    """Kernel vs fp64 reference, forward + backward with one upstream gradient: every attention
    term within ``tol`` (a term whose output rounding alone exceeds ``tol`` within twice that
    floor), and, given ``terms`` (v2), the kernel's fp32 O and dQ attention term within ``tol``."""
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(99)).to(q.dtype).to(DEVICE)

    def run(q, k, v):
        return hilt_kernels.hilt_attention(q, k, v, scale=scale, config=config, impl=impl)

    errors, ref = attention_errors(run, q, k, v, scale, grad_out)
    limits = {name: max(tol, 2 * ref["floors"][name]) for name in errors}
    if terms is not None and terms.o_attn:  # v2's own fp32 terms: the full tolerance, no floor
        o_attn = terms.o_attn[-1].reshape(ref["o_ref"].shape)
        errors["O fp32"], limits["O fp32"] = rel_err(o_attn, ref["o_ref"]), tol
        if terms.dq_attn:
            dq_attn = terms.dq_attn[-1].reshape(ref["dq_ref"].shape)
            errors["dQ fp32"], limits["dQ fp32"] = rel_err(dq_attn, ref["dq_ref"]), tol
    bad = {name: (e, limits[name]) for name, e in errors.items() if not e <= limits[name]}
    assert not bad, (bad, errors, ref["floors"])


@pytest.fixture
def terms(monkeypatch):
    return InternalTerms(monkeypatch)


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
def test_matches_fp64_reference(shape_q, n, dtype, kv_same, scale, impl, terms):
    q, k, v = make_inputs(shape_q, n, dtype, kv_same, seed=n)
    check_against_reference(q, k, v, scale, TOL[dtype], impl=impl, terms=terms if impl == "v2" else None)


def _drop_o(q, k, v, scale=None):
    """A broken kernel stand-in: returns q, the attention term dropped (dK = 0, dQ = dO)."""
    return q + 0.0 * (hilt_attention_reference(q, k, v, scale) - q)


def _drop_dq_term(q, k, v, scale=None):
    """A broken stand-in with the right output whose dQ lacks its attention part (dQ = dO)."""
    return hilt_attention_reference(q.detach(), k, v, scale) - q.detach() + q


def _shrink_o(q, k, v, scale=None):
    """A stand-in whose attention term is 2 % too small: the residual hides it in max-abs(out)."""
    return q + 0.98 * (hilt_attention_reference(q, k, v, scale) - q)


@pytest.mark.parametrize(
    "broken, term",
    [(_drop_o, "O"), (_drop_dq_term, "dQ-dO"), (_shrink_o, "O")],
    ids=["drop-O", "drop-dQ", "O-2%"],
)
def test_check_fails_for_a_broken_kernel(broken, term):
    """The attention-term check catches what max-abs error over ``out = q + O`` missed (issue 24):
    at C = 768, N = 4096 a 2 % error in O moves max|out - ref| / max|ref| by < 1e-3."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 64, 768, generator=gen).requires_grad_()
    k = torch.randn(1, 4096, 768, generator=gen).requires_grad_()
    grad_out = torch.randn(q.shape, generator=gen)
    errors, ref = attention_errors(broken, q, k, k, None, grad_out)
    assert errors[term] > TOL[torch.bfloat16], errors
    if broken is _shrink_o:  # the old metric would have passed it, even at the fp16 tolerance
        with torch.no_grad():
            out = broken(q, k, k)
            want = ref["o_ref"] + q.double()
        assert ((out.double() - want).abs().max() / want.abs().max()).item() < TOL[torch.float16]
    with pytest.raises(AssertionError):  # the shared check rejects it too
        q.grad = k.grad = None
        errors, ref = attention_errors(broken, q, k, k, None, grad_out)
        assert all(e <= TOL[torch.bfloat16] for e in errors.values()), errors


def test_smem_model_decides_what_runs():
    """v2 runs a head only with a config whose every pass fits the sm_90 shared-memory limit (the
    model, checked against compiled kernels in tests/test_kernel_compile.py); else v1."""
    bf16 = torch.bfloat16
    for d, same in ((768, True), (768, False), (1024, True), (1024, False), (64, True)):
        cfg = launch.pick_fused_config(64, 32768, d, bf16, interpret=False, same_kv=same)
        assert cfg is not None and launch.config_fits(cfg, d, bf16, same), (d, same, cfg)
        for kind in launch.passes(cfg, d):
            assert launch.smem_bytes(kind, cfg, d, 2, same) + launch.SMEM_MARGIN <= launch.SMEM_LIMIT
        assert launch.fused_supported(d, bf16, same)
    # The old C <= 1024 rule admitted this: the dQ pass with 64-key tiles needs 266,240 B at C = 1024.
    old = launch.FusedConfig(32, 64, 256, num_stages=2, bwd_block_n=16, bwd_num_stages=1, bwd_fused_dq=False)
    assert launch.smem_bytes("dq", old, 1024, 2, True) == 266240
    assert not launch.config_fits(old, 1024, bf16, True) and launch.config_fits(old, 768, bf16, True)
    wide = launch.pick_fused_config(64, 4096, 1024, bf16, interpret=False, same_kv=True)
    assert wide.block_n < launch.pick_fused_config(64, 4096, 768, bf16, interpret=False, same_kv=True).block_n
    assert (
        not launch.fused_supported(2048, bf16) and launch.pick_fused_config(64, 99, 2048, bf16, False) is None
    )


def test_v1_takes_heads_no_v2_config_fits(monkeypatch):
    """No v2 config fits: hilt_attention runs v1 (here forced by an empty choice)."""
    monkeypatch.setattr(kv2, "pick_fused_config", lambda *a, **kw: None)
    calls = []
    apply = ka._HiltAttention.apply
    monkeypatch.setattr(ka._HiltAttention, "apply", lambda *a: calls.append(1) or apply(*a))
    q, k, _ = make_inputs((1, 3, 32), 40, torch.float32, True, seed=2)
    out = hilt_kernels.hilt_attention(q, k, k)
    assert calls == [1] and rel_err(out - q, hilt_attention_reference(q, k, k).detach() - q) < 1e-4


def test_host_decisions_are_cached():
    """The tile choice and the key split are computed once per shape, not per call."""
    launch.fa2_num_splits.cache_clear()
    kv2._forward_splits.cache_clear()
    cfg = launch.pick_fused_config(64, 32768, 768, torch.bfloat16, interpret=False)
    assert launch.pick_fused_config(64, 32768, 768, torch.bfloat16, interpret=False) is cfg
    first = kv2.forward_splits(cfg, 2, 64, 32768, torch.device("cpu"))
    assert kv2.forward_splits(cfg, 2, 64, 32768, torch.device("cpu")) == first
    assert kv2._forward_splits.cache_info().hits == 1 and launch.fa2_num_splits.cache_info().misses == 1


def test_autocast_runs_the_kernel_in_the_autocast_dtype(monkeypatch):
    """Under autocast fp32 inputs take the low-precision kernel (cast once, k is v kept), the output
    is in the autocast dtype, and fp32 leaves get fp32 gradients of the right attention terms."""
    dtypes = []
    forward = kv2._forward
    monkeypatch.setattr(
        kv2, "_forward", lambda q, k, v, *a: dtypes.append((q.dtype, k is v)) or forward(q, k, v, *a)
    )
    q, k, _ = make_inputs((1, 9, 64), 70, torch.float32, True, seed=8)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.float16):
        out = hilt_kernels.hilt_attention(q, k, k)
    assert dtypes == [(torch.float16, True)] and out.dtype == torch.float16
    out.backward(g.half())
    assert q.grad.dtype == k.grad.dtype == torch.float32
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    want = hilt_attention_reference(q64, k64, k64)
    want.backward(g.half().double())
    assert rel_err(k.grad, k64.grad) < 1e-2
    assert rel_err(q.grad - g.half().float(), q64.grad - g.half().double()) < 1e-2
    wrapped = kv2._HiltAttentionV2.forward, kv2._HiltAttentionV2.backward
    assert all("autocast_mode" in fn.__code__.co_filename for fn in wrapped)  # torch.amp.custom_fwd / bwd


V2_SMALL = dict(block_m=16, block_n=32, block_d=64, num_splits=3, bwd_block_n=32, bwd_num_splits=2)


@pytest.mark.parametrize("kv_same", [True, False], ids=["k-is-v", "k-v"])
@pytest.mark.parametrize(
    "width, change",
    [
        (200, {}),  # 4 C chunks of 64 (ragged last), fused dQ, one dK/dV query chunk of 32
        (200, dict(bwd_fused_dq=False)),  # the wide GPU path: dK/dV pass, then a dQ-only pass
        (200, dict(kv_block_m=16)),  # 2 host query chunks for dK/dV, summed in fp32
        (200, dict(bwd_hybrid=True)),  # the wide GPU default: P, scale dS written once, dK by GEMM
        (48, dict(block_d=64, bwd_fused_dq=False, kv_block_m=16)),  # narrow: Q, dO resident
    ],
    ids=["wide-fused", "wide-two-pass", "wide-kv-chunks", "wide-hybrid", "narrow-two-pass-chunks"],
)
def test_v2_small_tiles_chunks_splits(kv_same, width, change, terms):
    """Explicit small v2 tiles: 2 query blocks, 3 / 2 key splits, every C-chunk count and path."""
    cfg = launch.FusedConfig(**{**V2_SMALL, **change})
    q, k, v = make_inputs((2, 20, width), 301, torch.float32, kv_same, seed=7)
    check_against_reference(q, k, v, None, TOL[torch.float32], config=cfg, terms=terms)


def test_v2_fp16_multi_head_two_pass(terms):
    """fp16 [B, H, N', d] through the two-pass backward with a few splits (low-precision casts)."""
    cfg = launch.FusedConfig(**{**V2_SMALL, "block_d": 32, "bwd_fused_dq": False})
    q, k, v = make_inputs((1, 2, 9, 32), 97, torch.float16, False, seed=21)
    check_against_reference(q, k, v, None, TOL[torch.float16], config=cfg, terms=terms)


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
def test_non_contiguous_multi_head(impl, terms):
    """[B, N, H, d] storage viewed as [B, H, N, d]: the kernels follow strides, not layout."""
    q, k, v = make_inputs((2, 3, 6, 32), 70, torch.float32, False, seed=3, transposed=True)
    assert not q.is_contiguous()
    check_against_reference(
        q, k, v, None, TOL[torch.float32], impl=impl, terms=terms if impl == "v2" else None
    )


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
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    hilt_kernels.hilt_attention(q, k, v, impl=impl).backward(g)
    q64 = q.detach().double().requires_grad_()
    hilt_attention_reference(q64, k.double(), v.double()).backward(g.double())
    assert k.grad is None and v.grad is None
    assert rel_err(q.grad - g, q64.grad - g.double()) <= 1e-4  # dQ's attention term


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
    assert rel_err(out2 - q, (out1 - q).detach()) <= 1e-5  # the attention terms agree
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
        ((2, 64, 768), 4096, True, 1.0),  # the paper's literal formula (no 1/sqrt(C))
        ((2, 64, 768), 32768, True, None),  # the target shape, K is V
        ((2, 64, 768), 4097, False, 1.0),
        ((2, 12, 64, 64), 32768, True, None),
        ((2, 64, 768), 32768, False, None),  # the target shape
        ((1, 511, 1024), 1000, False, None),  # widest head: smaller key tiles that fit (launch.config_fits)
    ],
)
@pytest.mark.parametrize("impl", ["v2", "v1"])
def test_bf16_on_gpu(shape_q, n, kv_same, scale, impl, terms):
    q, k, v = make_inputs(shape_q, n, torch.bfloat16, kv_same, seed=n)
    check_against_reference(
        q, k, v, scale, TOL[torch.bfloat16], impl=impl, terms=terms if impl == "v2" else None
    )


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
    """The bench runs end to end on a CPU (interpreter), prints a table and a JSON line, writes JSON,
    and appends every row to a JSON-lines file as it is measured (a timeout keeps what finished)."""
    if torch.cuda.is_available():
        pytest.skip("the GPU bench is a benchmark, not a test")
    from hilt_kernels import bench

    payload = bench.main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "interpreter" in printed and json.loads(printed.strip().splitlines()[-1]) == payload
    assert json.loads((tmp_path / "kernel_bench_quick.json").read_text()) == payload
    assert "triton-v1" in (tmp_path / "kernel_bench_quick.txt").read_text()
    lines = [json.loads(line) for line in (tmp_path / "kernel_bench_quick.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["header"] + ["row"] * len(payload["rows"])
    assert [r["impl"] for r in lines[1:]] == [r["impl"] for r in payload["rows"]]
    impls = {r["impl"] for r in payload["rows"]}
    assert impls == {"eager", "sdpa", "triton", "triton-v1"}
    assert bench.out_paths(str(tmp_path / "x.json"), "kernel_bench") == (
        str(tmp_path / "x.json"),
        str(tmp_path / "x.txt"),
    )
    assert payload["interpreter"] and payload["torch"] == torch.__version__
    triton_row = next(r for r in payload["rows"] if r["impl"] == "triton")
    assert triton_row["err_O"] < 1e-4 and triton_row["err_grads"] < 1e-4, triton_row
    assert triton_row["floor_O"] < 1e-6 and triton_row["fwd_graph_ms"] is None  # no CUDA graphs on a CPU
    assert triton_row["kernel_us"], triton_row  # the profiler's split of one fwd + bwd
    assert len(triton_row["fwd_ms"]) == 3 and triton_row["fwd_ms"][1] > 0


def test_bench_row_failures_are_caught_backward_included(tmp_path):
    """A failing implementation (here: its backward raises) gives an error row; the rest go on."""
    from hilt_kernels import bench

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("out of resource: shared memory")

    impls = {"eager": hilt_attention_reference, "broken": lambda q, k, v: Boom.apply(q)}
    seen = []
    rows = bench.run_shape(
        bench.Shape(1, 0, 4, 16, 8, True), impls, torch.float32, torch.device("cpu"), 1e9, on_row=seen.append
    )
    assert [r["impl"] for r in rows] == ["eager", "broken"] and seen == rows
    assert "error" not in rows[0] and "shared memory" in rows[1]["error"]
    assert "FAILED" in bench.format_table(rows)


def test_backward_traffic_table():
    """The bytes table behind the hybrid backward (README): at B=2, N'=64, N=32768, C=768 bf16,
    K is V, P and scale dS are 16.8 MB, the hybrid moves fewer DRAM bytes than the two-pass design
    and none of its 805 MB of per-key-block Q / dO re-reads."""
    from hilt_kernels import traffic

    rows = traffic.backward_traffic(2, 64, 32768, 768)
    two, hybrid = rows["two-pass (dK/dV + dQ)"], rows["hybrid (P, dS + GEMM)"]
    assert "16.8 MB" in hybrid["note"] and round(two["l2_rereads"] / 1e6, 1) == 805.3
    assert hybrid["dram"] < two["dram"] and hybrid["l2_rereads"] < two["l2_rereads"] / 50
    assert traffic.format_table(rows).count("\n") == len(rows) + 1
