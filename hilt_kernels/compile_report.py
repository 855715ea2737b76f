"""Compile evidence without a GPU: the launches ``hilt_attention`` makes, compiled the way the JIT would.

``python -m hilt_kernels.bench --compile-only [--impl v2|v1] [--arch 90]`` lands here. For each shape
it records the launches of the chosen implementation (host code run on small CPU tensors with the
GPU tile choice), then compiles each kernel for ``cuda:<arch>`` with *Triton's own JIT
specialisation*: the binder the JIT builds for the kernel (``create_function_from_signature``)
is applied to the very arguments of the launch, then ``JITFunction._pack_args``, exactly as
``JITFunction.run`` does before it compiles. So 16-byte-aligned pointers carry
``tt.divisibility = 16`` and stride-1 integers become the constant 1, as on aligned contiguous GPU
tensors (v1's old ``compile_launch`` dropped both and described a slower program). The report
gives, per kernel: registers, spill bytes (``ptxas -v``), shared memory, and whether the PTX
holds ``cp.async`` (pipelined loads), ``cp.async.bulk`` (TMA) and ``wgmma`` (Hopper tensor cores)
or only ``mma.sync``.
"""

import contextlib
import importlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from unittest import mock

import torch

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def capture_launches(shape, dtype: torch.dtype, impl: str = "v2", n_keys: int = 4096) -> list[tuple]:
    """(kernel function, args, kwargs) of every launch forward + backward make for ``shape``.

    Runs the host code with ``launch`` replaced by a recorder on CPU tensors (aligned, contiguous,
    like fresh CUDA tensors) and with the GPU tile choice (``interpreting`` forced off). Key
    splits use the CPU stand-in of 4 SMs, which changes only runtime integers, not the program.
    """
    launch_mod = importlib.import_module("hilt_kernels.launch")
    mod = importlib.import_module(f"hilt_kernels.hilt_{impl}")
    calls = []

    def record(fn, grid, *args, **kwargs):
        calls.append((fn, args, kwargs))

    heads = max(shape.heads, 1)
    q = torch.randn((1, heads, shape.queries, shape.width), dtype=dtype)
    k = torch.randn((1, heads, n_keys, shape.width), dtype=dtype)
    v = k if shape.kv_same else torch.randn_like(k)
    stats = torch.zeros(q.shape[:-1])
    patches = [mock.patch.object(launch_mod, "interpreting", lambda: False)]
    if impl == "v2":
        bwd = importlib.import_module("hilt_kernels.hilt_v2_bwd")
        patches += [mock.patch.object(mod, "launch", record), mock.patch.object(bwd, "launch", record)]
    else:
        patches += [mock.patch.object(mod, "launch", record)]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        if impl == "v2":
            cfg = launch_mod.pick_fused_config(
                shape.queries, n_keys, shape.width, dtype, same_kv=shape.kv_same
            )
            mod._forward(q, k, v, 1.0, cfg)
            o_attn = torch.zeros(q.shape)
            bwd.backward(q, k, None if shape.kv_same else v, q, o_attn, stats, 1.0, cfg, (True, True, True))
        else:
            mod._forward(q, k, v, 1.0)
            cfg = mod.pick_config(shape.queries, n_keys, shape.width, dtype)
            if mod.pow2(shape.width) <= mod.NARROW_HEAD:
                mod._backward_narrow(q, k, v, q, stats, stats, 1.0, shape.kv_same, cfg)
            else:
                mod._backward_p_ds(q, k, v, q, stats, stats, 1.0, cfg)
    return calls


def jit_specialisation(fn: Callable, args: tuple, kwargs: dict, arch: int):
    """(jit_fn, backend, options, signature, constexprs, attrs) as ``JITFunction.run`` derives them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):  # a real JITFunction, whatever the mode
        jit_fn = triton.jit(fn)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return jit_fn, target, options, signature, constexprs, attrs


def compile_like_jit(fn: Callable, args: tuple, kwargs: dict, arch: int = 90):
    """Compile one recorded launch for ``cuda:<arch>`` with the JIT's specialisation; no GPU needed."""
    import triton
    from triton.compiler import ASTSource

    jit_fn, target, options, signature, constexprs, attrs = jit_specialisation(fn, args, kwargs, arch)
    return triton.compile(
        ASTSource(jit_fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` (the newest ptxas triton ships)."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        exe = os.path.join(bin_dir, name)
        if not os.path.exists(exe):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            run = subprocess.run(
                [exe, f"-arch=sm_{arch}a", "-v", src, "-o", os.path.join(tmp, "k.o")],
                capture_output=True,
                text=True,
            )
        regs = re.search(r"Used (\d+) registers", run.stderr)
        spills = re.search(r"(\d+) bytes spill stores", run.stderr)
        if run.returncode == 0 and regs and spills:
            return {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1))}
    return {"registers": None, "spill_bytes": None}


def ptx_features(ptx: str) -> dict:
    """Which load and matrix instructions the PTX uses."""
    return {
        "cp_async": "cp.async.ca" in ptx or "cp.async.cg" in ptx,
        "tma": "cp.async.bulk" in ptx,
        "wgmma": "wgmma.mma_async" in ptx,
        "mma_sync": "mma.sync" in ptx,
    }


def ttgir_pipeline(ttgir: str) -> dict:
    """What the TTGIR says about the software pipeline: the most copies of one loaded tile in
    shared memory (``memdesc<Sx...>`` of a mutable ``local_alloc``: S buffers), and the largest
    ``async_wait {num = W}`` (W > 0: that many cp.async groups stay in flight while the loop body
    runs, so loads overlap compute; W = 0 everywhere: the loop waits for its loads)."""
    bufs = [int(b) for b in re.findall(r"local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+", ttgir)]
    waits = [int(w) for w in re.findall(r"async_wait[^\n{]*\{num = (\d+)", ttgir)]
    return {"pipeline_buffers": max(bufs, default=0), "async_wait_max": max(waits, default=None)}


def pass_kind(fn_name: str, kwargs: dict) -> str | None:
    """The ``launch.smem_bytes`` pass of a v2 launch: fwd, kv (dK/dV) or dq (dQ-only / hybrid)."""
    if fn_name == "_fwd_kernel":
        return "fwd"
    if fn_name == "_bwd_kernel":
        return "kv" if kwargs.get("WRITE_KV") else "dq"
    return None


def kernel_row(fn, args, kwargs, arch: int, case: str, dtype: torch.dtype) -> dict:
    """Compile one launch and describe it."""
    kernel = compile_like_jit(fn, args, kwargs, arch)
    ptx = kernel.asm["ptx"]
    tiles = {k: v for k, v in kwargs.items() if k.startswith(("BLOCK", "NC", "num_", "WRITE"))}
    return {
        "kernel": fn.__name__,
        "case": case,
        "dtype": DTYPES[dtype],
        "shared_bytes": kernel.metadata.shared,
        **ptxas_usage(ptx, arch),
        **ptx_features(ptx),
        **ttgir_pipeline(kernel.asm.get("ttgir", "")),
        **tiles,
    }


def report(arch: int = 90, impl: str = "v2", dtypes=(torch.bfloat16,), shapes=None) -> dict:
    """Compile every launch of ``impl`` for the issue's shapes; print one line each, return rows."""
    import triton

    from hilt_kernels.bench import Shape

    shapes = shapes or [
        Shape(1, 0, 64, 4096, 768, True),
        Shape(1, 0, 64, 4096, 768, False),
        Shape(1, 12, 64, 4096, 64, True),
        Shape(1, 12, 64, 4096, 64, False),
    ]
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            for fn, args, kwargs in capture_launches(shape, dtype, impl):
                rows.append(kernel_row(fn, args, kwargs, arch, shape.label(), dtype))
    payload = {"arch": arch, "impl": impl, "triton": triton.__version__, "rows": rows}
    print(format_rows(payload))
    return payload


def format_rows(payload: dict) -> str:
    """One line per compiled launch: registers, spills, shared memory, load / matrix instructions."""
    lines = [f"triton {payload['triton']}, sm_{payload['arch']}, impl {payload['impl']} (JIT specialisation)"]
    for r in payload["rows"]:
        feats = ",".join(k for k in ("cp_async", "tma", "wgmma", "mma_sync") if r[k]) or "-"
        tiles = " ".join(f"{k}={v}" for k, v in r.items() if k.startswith(("BLOCK", "NC", "num_", "WRITE")))
        lines.append(
            f"{r['kernel']:<20} {r['case']:<28} {r['dtype']:<5} regs={r['registers']} "
            f"spill={r['spill_bytes']}B smem={r['shared_bytes']} bufs={r.get('pipeline_buffers')} "
            f"wait={r.get('async_wait_max')} {feats} {tiles}"
        )
    return "\n".join(lines)
