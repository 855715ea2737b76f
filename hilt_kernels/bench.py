"""Benchmark HILT attention: eager, torch.compile, SDPA and the fused Triton kernel.

    python -m hilt_kernels.bench --out DIR            # full grid on a GPU (B 1/2/4, N 512/4096/32768)
    python -m hilt_kernels.bench --quick --out DIR    # the HILT rows: B=2, N 4096 and 32768
    python -m hilt_kernels.bench --compile-only       # any machine: sm_90 compile evidence (no GPU)

For every shape and implementation: forward and forward+backward time (p50 of
``triton.testing.do_bench``, p20/p80 in the JSON), the share of the copy roofline (bytes = each
input read once, K=V once when aliased, each output written once, over a copy bandwidth this run
measures itself), and the max relative error of the output and of the gradients against the
float64 eager reference. The Triton row also gives its speed-up over the best torch implementation.
Triton rows: ``triton`` is v2 (the default kernel), ``triton-v1`` the first kernel.
Prints a table, then one JSON line; writes ``kernel_bench[_quick].txt`` (the table) and ``.json``
under ``--out`` (a directory) with the project's atomic writer (``shards.io``).

Without CUDA it runs a few small fp32 shapes through the Triton interpreter and says so: those
timings measure the interpreter, not a kernel, and only show that the command works end to end.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from shards.io import write_json_atomic, write_text_atomic


@dataclass(frozen=True)
class Shape:
    """One benchmark case: heads=0 means the paper's single head [B, N', C]."""

    batch: int
    heads: int
    queries: int
    keys: int
    width: int  # C for a single head, d per head otherwise
    kv_same: bool

    def label(self) -> str:
        """Short human name, e.g. ``B2 N32768 C768 k=v``."""
        head = f"C{self.width}" if self.heads == 0 else f"{self.heads}x{self.width}"
        return f"B{self.batch} N'{self.queries} N{self.keys} {head} {'k=v' if self.kv_same else 'k,v'}"

    def q_shape(self) -> tuple[int, ...]:
        lead = (self.batch,) if self.heads == 0 else (self.batch, self.heads)
        return (*lead, self.queries, self.width)

    def k_shape(self) -> tuple[int, ...]:
        return (*self.q_shape()[:-2], self.keys, self.width)


def gpu_shapes(quick: bool) -> list[Shape]:
    """The issue's grid: B in {1,2,4}, N in {512, 4096, 32768}, C=768 and 12x64, k=v and k,v."""
    batches, keys = ((2,), (4096, 32768)) if quick else ((1, 2, 4), (512, 4096, 32768))
    return [
        Shape(b, heads, 64, n, width, kv_same)
        for b in batches
        for n in keys
        for heads, width in ((0, 768), (12, 64))
        for kv_same in (True, False)
    ]


def cpu_shapes(quick: bool) -> list[Shape]:
    """Small shapes the interpreter finishes in seconds."""
    shapes = [Shape(1, 0, 16, 512, 256, True), Shape(1, 4, 16, 512, 64, False)]
    return shapes[:1] if quick else shapes


def sdpa_hilt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """HILT attention through torch's scaled_dot_product_attention (the model's fallback path)."""
    return q + F.scaled_dot_product_attention(q, k, v, scale=scale)


TORCH_IMPLS = ("eager", "sdpa", "compile")


def implementations(use_compile: bool) -> dict[str, Callable]:
    """Name -> callable(q, k, v) for every implementation measured."""
    from hilt_kernels import hilt_attention
    from hilt_kernels.reference import hilt_attention_reference

    impls = {"eager": hilt_attention_reference, "sdpa": sdpa_hilt}
    if use_compile:
        # Every (rank, K-is-V, dtype) combination is its own graph: allow enough recompiles that
        # no shape silently falls back to eager.
        dynamo_config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
        impls["compile"] = torch.compile(hilt_attention_reference)
    impls["triton"] = lambda q, k, v: hilt_attention(q, k, v, impl="v2")
    impls["triton-v1"] = lambda q, k, v: hilt_attention(q, k, v, impl="v1")
    return impls


def sweep_configs(shape: Shape, dtype: torch.dtype) -> dict[str, Callable]:
    """Extra v2 rows with other tile choices, to tune ``pick_fused_config`` on a GPU (--sweep)."""
    from hilt_kernels import hilt_attention
    from hilt_kernels.launch import NARROW_HEAD, pick_fused_config

    base = pick_fused_config(
        shape.queries, shape.keys, shape.width, dtype, interpret=False, same_kv=shape.kv_same
    )
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 4
    programs = shape.batch * max(shape.heads, 1) * -(-shape.queries // base.block_m)
    full_wave = max(1, sms * base.programs_per_sm // programs)  # e.g. 33 splits x 4 = 132 SMs, not 29 x 4
    if shape.width > NARROW_HEAD:  # wide single head
        variants = {
            "wave": dict(num_splits=full_wave, bwd_num_splits=full_wave),
            # the previous forward: 2 stages = one K buffer, the loop waits for its loads
            "n64s2": dict(block_n=64 if shape.kv_same else 32, num_stages=2),
            "m64w16": dict(block_m=64, num_warps=16),  # wgmma, K read once (spills a little)
            "2/sm": dict(programs_per_sm=2),
            "bwd-two-pass": dict(bwd_hybrid=False),  # the previous backward: dK/dV pass + dQ pass
            "bwd-fused": dict(bwd_hybrid=False, bwd_fused_dq=True),  # one pass, dQ on chip (spills)
        }
    else:
        variants = {
            "n128": dict(block_n=128),
            "w8": dict(num_warps=8, bwd_num_warps=8),
            "2/sm": dict(programs_per_sm=2),
            "bwd-n32": dict(bwd_block_n=32),
        }
    out = {}
    for name, change in variants.items():
        cfg = dataclasses.replace(base, **change)
        out[f"triton[{name}]"] = lambda q, k, v, cfg=cfg: hilt_attention(q, k, v, config=cfg, impl="v2")
    return out


def time_ms(fn: Callable[[], object], grads: list[torch.Tensor], on_gpu: bool) -> list[float]:
    """[p20, p50, p80] milliseconds: triton's do_bench on a GPU, a wall clock otherwise."""
    if on_gpu:
        import triton.testing

        return list(triton.testing.do_bench(fn, grad_to_none=grads, quantiles=[0.2, 0.5, 0.8]))
    fn()  # warm up (the interpreter wraps kernels on first use)
    samples = []
    for _ in range(3):
        for t in grads:
            t.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return [samples[0], statistics.median(samples), samples[-1]]


def copy_bandwidth(device: torch.device, on_gpu: bool) -> float:
    """Bytes per second of a plain device copy (read + write), the roofline's denominator."""
    n = (1 << 30 if on_gpu else 1 << 26) // 2  # 1 GiB of bf16 on a GPU, 64 MiB on a CPU
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), [], on_gpu)[1]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def roofline_bytes(shape: Shape, elem: int, backward: bool) -> int:
    """Bytes that must move: inputs read once (K=V once), outputs written once; bwd adds its own."""
    q = math.prod(shape.q_shape())
    k = math.prod(shape.k_shape())
    kv = k if shape.kv_same else 2 * k
    fwd = q + kv + q  # read q, k, v; write out
    bwd = q + kv + q + q + kv  # read q, k, v, dout; write dq, dk (+ dv)
    return elem * (fwd + bwd if backward else fwd)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error ||got - want|| / ||want|| in float64 (NaN stays NaN)."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def graph_ms(fn: Callable[[], object]) -> list[float] | None:
    """[p20, p50, p80] ms of ``fn`` replayed from a CUDA graph (no launch gaps), or None off CUDA
    or when capture fails (the reason is printed)."""
    if not torch.cuda.is_available():
        return None
    import triton.testing

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph (compiles, allocator pools)
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return list(triton.testing.do_bench(graph.replay, quantiles=[0.2, 0.5, 0.8]))
    except Exception as exc:  # capture can fail (host sync inside); the row keeps do_bench times
        print(f"CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:200]}")
        return None


def kernel_split(fn: Callable[[], object]) -> dict[str, float]:
    """Microseconds per GPU kernel (summed over launches) of one call of ``fn``, by torch.profiler;
    on a CPU the top CPU ops' self time instead. The 12 largest."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    fn()  # warm
    with profile(activities=acts) as prof:
        fn()
        if on_gpu:
            torch.cuda.synchronize()
    split: dict[str, float] = {}
    if on_gpu:
        for ev in prof.events():
            if ev.device_type == DeviceType.CUDA:
                split[ev.name] = split.get(ev.name, 0.0) + ev.time_range.elapsed_us()
    else:
        for ev in prof.key_averages():
            if ev.self_cpu_time_total > 0:
                split[ev.key] = float(ev.self_cpu_time_total)
    top = sorted(split.items(), key=lambda kv: -kv[1])[:12]
    return {name: round(us, 2) for name, us in top}


def attention_term_errors(out, q, dout, grads, ref, ref_grads, dtype) -> dict:
    """Relative Frobenius errors of the attention terms (O = out - q, dQ - dO, dK, dV) against the
    fp64 reference, with the floor a perfect kernel reaches on O and dQ - dO once its output is
    rounded to ``dtype`` (the residual q, dO dwarfs the attention term at uniform softmax)."""
    o_ref = ref.detach() - q.detach().double()
    dq_ref = ref_grads[0] - dout.double()
    errs = {
        "err_O": rel_err(out.detach().double() - q.detach().double(), o_ref),
        "err_dQ": rel_err(grads[0].double() - dout.double(), dq_ref),
        "err_dK": rel_err(grads[1], ref_grads[1]),
    }
    if len(grads) > 2:
        errs["err_dV"] = rel_err(grads[2], ref_grads[2])
    for name, exact, residual in (("O", o_ref, q.detach()), ("dQ", dq_ref, dout)):
        total = residual.double() + exact
        errs[f"floor_{name}"] = rel_err(total.to(dtype).double() - residual.double(), exact)
    return errs


def run_shape(
    shape: Shape,
    impls: dict[str, Callable],
    dtype: torch.dtype,
    device: torch.device,
    bw: float,
    on_row: Callable[[dict], None] | None = None,
    profile_impls: tuple[str, ...] = ("triton",),
) -> list[dict]:
    """Measure every implementation on one shape; one row per implementation, each handed to
    ``on_row`` as soon as it is measured. A failing implementation (a sweep config that does not
    fit, an OOM) gives a row with its error, forward and backward alike, and the rest go on."""
    from hilt_kernels.reference import hilt_attention_reference

    on_gpu = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(shape.q_shape(), generator=gen, device=device, dtype=dtype).requires_grad_()
    k = torch.randn(shape.k_shape(), generator=gen, device=device, dtype=dtype).requires_grad_()
    v = (
        k
        if shape.kv_same
        else torch.randn(shape.k_shape(), generator=gen, device=device, dtype=dtype).requires_grad_()
    )
    leaves = [q, k] if shape.kv_same else [q, k, v]
    dout = torch.randn(shape.q_shape(), generator=gen, device=device, dtype=dtype)

    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    v64 = k64 if shape.kv_same else v.detach().double().requires_grad_()
    ref = hilt_attention_reference(q64, k64, v64)
    ref.backward(dout.double())
    ref_grads = [q64.grad, k64.grad] if shape.kv_same else [q64.grad, k64.grad, v64.grad]

    elem = torch.finfo(dtype).bits // 8
    rows = []
    for name, fn in impls.items():
        base = {"shape": shape.label(), **asdict(shape), "impl": name}
        for t in leaves:
            t.grad = None
        try:
            out = fn(q, k, v)
            out.backward(dout)
            errs = attention_term_errors(out, q, dout, [t.grad for t in leaves], ref, ref_grads, dtype)
            with torch.no_grad():  # inference forward: nothing kept for a backward
                fwd = time_ms(lambda fn=fn: fn(q, k, v), [], on_gpu)
                fwd_graph = graph_ms(lambda fn=fn: fn(q, k, v)) if on_gpu else None
            fb = time_ms(lambda fn=fn: fn(q, k, v).backward(dout), leaves, on_gpu)
            split = kernel_split(lambda fn=fn: fn(q, k, v).backward(dout)) if name in profile_impls else None
        except Exception as exc:  # noqa: BLE001 - a row per failure, the grid goes on
            row = {**base, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{shape.label()} {name}: {row['error']}")
            if on_gpu:
                torch.cuda.empty_cache()
        else:
            row = {
                **base,
                "fwd_ms": fwd,
                "fwd_graph_ms": fwd_graph,
                "fwd_bwd_ms": fb,
                "fwd_roofline_pct": 100 * roofline_bytes(shape, elem, False) / bw / (fwd[1] * 1e-3),
                "fwd_bwd_roofline_pct": 100 * roofline_bytes(shape, elem, True) / bw / (fb[1] * 1e-3),
                **errs,
                "err_grads": max(e for key, e in errs.items() if key.startswith("err_d")),
                "kernel_us": split,
            }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    torch_rows = [r for r in rows if r["impl"] in TORCH_IMPLS and "error" not in r]
    for r in rows:
        if r["impl"].startswith("triton") and torch_rows and "error" not in r:
            r["speedup_fwd"] = min(t["fwd_ms"][1] for t in torch_rows) / r["fwd_ms"][1]
            r["speedup_fwd_bwd"] = min(t["fwd_bwd_ms"][1] for t in torch_rows) / r["fwd_bwd_ms"][1]
    return rows


def format_table(rows: list[dict]) -> str:
    """Human-readable table: one line per (shape, implementation)."""
    head = f"{'shape':<32} {'impl':<20} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd %roof':>9} {'f+b %roof':>9} "
    head += f"{'err O':>8} {'err dQKV':>8} {'floor O':>8} {'graph ms':>9} {'speedup':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:<32} {r['impl']:<20} FAILED {r['error'][:80]}")
            continue
        speed = f"{r['speedup_fwd']:.2f}/{r['speedup_fwd_bwd']:.2f}" if "speedup_fwd" in r else ""
        graph = f"{r['fwd_graph_ms'][1]:.4f}" if r.get("fwd_graph_ms") else "-"
        lines.append(
            f"{r['shape']:<32} {r['impl']:<20} {r['fwd_ms'][1]:>9.4f} {r['fwd_bwd_ms'][1]:>11.4f} "
            f"{r['fwd_roofline_pct']:>9.1f} {r['fwd_bwd_roofline_pct']:>9.1f} "
            f"{r['err_O']:>8.1e} {r['err_grads']:>8.1e} {r['floor_O']:>8.1e} {graph:>9} {speed:>11}"
        )
    return "\n".join(lines)


def out_paths(out: str, name: str) -> tuple[str, str]:
    """(json, txt) paths: ``DIR/name.json`` and ``DIR/name.txt``, or ``X.json`` and ``X.txt`` when
    ``--out`` names a .json file (the GPU script's form)."""
    if out.endswith(".json"):
        return out, out.removesuffix(".json") + ".txt"
    return os.path.join(out, name + ".json"), os.path.join(out, name + ".txt")


def stream_path(out: str, name: str) -> str:
    """The JSON-lines file rows are appended to: ``--out`` itself when it ends in .jsonl, else
    ``DIR/name.jsonl`` (``X.jsonl`` beside an ``X.json``)."""
    if out.endswith(".jsonl"):
        return out
    if out.endswith(".json"):
        return out.removesuffix(".json") + ".jsonl"
    return os.path.join(out, name + ".jsonl")


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON line and flush it to disk (the file survives a killed process)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark grid, print table + JSON line, write the JSON file; return the payload."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 (GPU) / fp32 (CPU)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (default: off on CPU)")
    parser.add_argument("--sweep", action="store_true", help="GPU: also time other Triton tile configs")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="no GPU needed: compile the kernels for --arch, print ptxas use",
    )
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-only")
    parser.add_argument("--impl", choices=["v2", "v1"], default="v2", help="kernel for --compile-only")
    parser.add_argument("--fp32", action="store_true", help="--compile-only: fp32 launches too")
    parser.add_argument(
        "--out",
        default="kernel_bench",
        help="directory for the table (.txt), .json and .jsonl; or a .json path; or a .jsonl path (rows only)",
    )
    parser.add_argument("--step", default="kernel_bench", help="the step name in the JSON lines")
    parser.add_argument("--impls", help="comma-separated implementations to run (default: all)")
    args = parser.parse_args(argv)
    name = "kernel_bench_quick" if args.quick else "kernel_bench"

    if args.compile_only:
        from hilt_kernels.compile_report import format_rows, report

        dtypes = (torch.bfloat16, torch.float32) if args.fp32 else (torch.bfloat16,)
        payload = report(args.arch, args.impl, dtypes)
        name = f"compile_{args.impl}_sm{args.arch}"
        json_path, text_path = out_paths(args.out, name)
        write_text_atomic(text_path, format_rows(payload) + "\n")
        write_json_atomic(json_path, payload)
        return payload
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels read it at launch
    import triton

    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if on_gpu else "fp32")
    ]
    if not on_gpu and dtype == torch.bfloat16:
        parser.error("bf16 needs a GPU: the Triton interpreter computes garbage for bf16 dots")
    device_name = (
        torch.cuda.get_device_name(device)
        if on_gpu
        else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    )
    if not on_gpu:
        print("No CUDA: running small shapes through the Triton interpreter; timings are NOT kernel timings.")

    bw = copy_bandwidth(device, on_gpu)
    impls = implementations(use_compile=on_gpu and not args.no_compile)
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls.split(",")}
    shapes = gpu_shapes(args.quick) if on_gpu else cpu_shapes(args.quick)
    if args.sweep and not on_gpu:
        print("--sweep: the tile variants are GPU configs; skipped in the interpreter")
    header = (f"device: {device_name} | torch {torch.__version__} | triton {triton.__version__} | dtype {dtype} "
              f"| copy {bw / 1e9:.0f} GB/s | times: p50 ms")  # fmt: skip
    payload = {
        "device": device_name,
        "interpreter": not on_gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "dtype": str(dtype).removeprefix("torch."),
        "copy_GBps": bw / 1e9,
        "time_stat": "ms [p20, p50, p80]",
    }
    stream = stream_path(args.out, name)
    append_jsonl(stream, {"step": args.step, "kind": "header", **payload})
    print(header, flush=True)

    def on_row(row: dict) -> None:  # appended as measured: a timeout keeps every finished row
        append_jsonl(stream, {"step": args.step, "kind": "row", **row})
        print(format_table([row]).splitlines()[-1], flush=True)

    rows = []
    for shape in shapes:
        extra = sweep_configs(shape, dtype) if args.sweep and on_gpu else {}
        rows.extend(run_shape(shape, {**impls, **extra}, dtype, device, bw, on_row=on_row))
        if on_gpu:
            torch.cuda.empty_cache()
    table = header + "\n" + format_table(rows)
    print(table)
    payload["rows"] = rows
    print(json.dumps(payload))
    if not args.out.endswith(".jsonl"):  # a .jsonl --out is the only file (the GPU script's form)
        json_path, text_path = out_paths(args.out, name)
        write_text_atomic(text_path, table + "\n")
        write_json_atomic(json_path, payload)
    return payload


if __name__ == "__main__":
    main()
