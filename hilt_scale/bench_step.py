"""Training-step benchmark: time, memory and throughput of one step per connector (the paper's Fig 1).

    python -m hilt_scale.bench_step                       # GPU: vit-base + llama3-8b, paper size, bf16
    python -m hilt_scale.bench_step --llm llama3-70b --connectors hilt --micro-batch 1   # QLoRA nf4
    python -m hilt_scale.bench_step --vision vit-micro --llm llm-micro --resolution cpu-micro  # CPU
    python -m hilt_scale.bench_step --from-json OUT/bench_step.json --loader-samples-per-s 3.1

Builds the full model from presets with random weights (no download: the LLM comes from the
preset's architecture numbers, a 4-bit base is quantised from random bf16 weights layer by layer
on the GPU), then for each connector x activation checkpointing (vision.grad_checkpointing and
llm.grad_checkpointing together) x micro-batch times training steps (forward, backward, AdamW;
warm-up excluded; CUDA events on GPU) on a synthetic batch: one random uint8 volume per sample and
``--text-tokens`` text tokens around the image slot. The parts are timed the same way in the same
run (ViT on HR, ViT on LR, LLM alone on text + the connector's visual tokens), so "step / parts"
reads off how much the connector and splicing cost. OOM is caught and reported per row.
Prints a Markdown table and one JSON line; ``--out DIR`` also writes bench_step.{md,json,png}.
Defaults: vit-base / llama3-8b / paper / bf16 with CUDA, vit-micro / llm-micro / cpu-micro / fp32
without.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hilt_scale.bench.report import finish_row, format_table, plot, targets
from hilt_scale.model.config import CONNECTOR_KINDS, ModelConfig, model_config, validate
from hilt_scale.model.connectors import build_connector
from hilt_scale.model.mllm import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    HiltReportModel,
    add_lora,
    build_llm,
    hf_config,
    resolve_attn_implementation,
)
from hilt_scale.model.visual import build_vision
from shards.io import write_json_atomic, write_text_atomic

GIB = 2**30
PROMPT_TOKENS = 16  # text tokens before the image slot; the rest is the "report" (with labels)
CPU_DEFAULTS = {"vision": "vit-micro", "llm": "llm-micro", "resolution": "cpu-micro"}
GPU_DEFAULTS = {"vision": "vit-base", "llm": "llama3-8b", "resolution": "paper"}


class StubTokenizer:
    """What building and running the model needs of a tokenizer: ids and the vocabulary size.

    The benchmark feeds token ids directly, so the preset's own vocabulary size (128256 for
    Llama-3) sets the embedding and lm_head shapes without loading a tokenizer.
    """

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size


def skip_reason(cfg: ModelConfig, device: torch.device) -> str | None:
    """Why this configuration cannot run here (4-bit without CUDA or bitsandbytes), else None."""
    if cfg.llm.quantization == "none":
        return None
    if device.type != "cuda":
        return f"{cfg.llm.quantization} 4-bit base needs bitsandbytes + CUDA; this run has no CUDA device"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "4-bit base needs bitsandbytes, which is not installed (carry .whl_bnb)"
    return None


def _random_nf4_llm(cfg: ModelConfig, tokenizer: StubTokenizer, device: torch.device) -> nn.Module:
    """The LLM with an nf4 base quantised from random bf16 weights one Linear at a time.

    build_llm quantises by saving the random bf16 model to disk and reloading it, which needs the
    whole bf16 model (140 GB for 70B) in memory and on disk; here the model is built on the meta
    device and each Linear (not lm_head) becomes a bitsandbytes Linear4bit filled on ``device``.
    """
    import bitsandbytes as bnb  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    bf16 = torch.bfloat16
    config = hf_config(cfg.llm, len(tokenizer), tokenizer)
    attn = resolve_attn_implementation(cfg.llm.attn_implementation)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=bf16)
    gen = torch.Generator(device).manual_seed(cfg.llm.seed)
    for parent in list(llm.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=bf16, compress_statistics=True, quant_type="nf4",
                    quant_storage=bf16, device="meta",
                )  # fmt: skip
                w = torch.empty(child.out_features, child.in_features, device=device, dtype=bf16)
                w.normal_(0.0, 0.02, generator=gen)
                q.weight = bnb.nn.Params4bit(
                    w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                    quant_storage=bf16, module=q,
                ).to(device)  # fmt: skip
                if child.bias is not None:
                    q.bias = nn.Parameter(torch.zeros(child.out_features, device=device, dtype=bf16))
                setattr(parent, name, q)
                del w
            elif "Rotary" in type(child).__name__:
                with torch.device(device):
                    setattr(parent, name, type(child)(config))
    for module in llm.modules():  # embeddings, norms, lm_head: still on meta
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                t = torch.empty(p.shape, device=device, dtype=p.dtype)
                t.fill_(1.0) if "norm" in type(module).__name__.lower() else t.normal_(
                    0.0, 0.02, generator=gen
                )
                setattr(module, pname, nn.Parameter(t, requires_grad=False))
    left = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"nf4 bench build left tensors on the meta device: {left[:5]}")
    llm.is_loaded_in_4bit = True  # peft picks its bnb LoRA layers by this flag
    llm.config.use_cache = False
    return add_lora(llm, cfg.llm)


def build_bench_llm(cfg: ModelConfig, device: torch.device) -> nn.Module:
    """Random-weight LLM (+ LoRA) of the preset's shapes on ``device``, never a download."""
    tok = StubTokenizer(cfg.llm.vocab_size)
    llm_cfg = dataclasses.replace(cfg.llm, path=None, tokenizer_path=None, grad_checkpointing=False)
    cfg = dataclasses.replace(cfg, llm=llm_cfg)
    if llm_cfg.quantization != "none":
        return _random_nf4_llm(cfg, tok, device)
    with torch.device(device):
        llm = build_llm(llm_cfg, tok)
    return llm.to(device)


def set_checkpointing(model: HiltReportModel, on: bool) -> None:
    """Activation checkpointing in the ViT and the LLM (non-reentrant, like build_llm)."""
    model.vision.cfg = dataclasses.replace(model.vision.cfg, grad_checkpointing=on)
    base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    # transformers 5.2x renamed gradient_ to activation_checkpointing_*; the GPU image has 5.17.
    kind = "activation" if hasattr(base, "activation_checkpointing_enable") else "gradient"
    if on:
        kwargs = {f"{kind}_checkpointing_kwargs": {"use_reentrant": False}}
        getattr(base, f"{kind}_checkpointing_enable")(**kwargs)
    else:
        getattr(base, f"{kind}_checkpointing_disable")()


def assemble(cfg: ModelConfig, llm: nn.Module, device: torch.device, dtype: torch.dtype) -> HiltReportModel:
    """ViT + connector of ``cfg`` around an already built LLM (shared across connectors)."""
    validate(cfg)
    width = llm.get_input_embeddings().weight.shape[1]
    with torch.device(device):
        vision = build_vision(cfg).to(dtype)
        connector = build_connector(cfg.connector, cfg.vision.width, width).to(dtype)
    model = HiltReportModel(cfg, vision, connector, llm, StubTokenizer(cfg.llm.vocab_size))
    return model.train()


def synthetic_batch(model: HiltReportModel, micro_batch: int, text_tokens: int, device: torch.device) -> dict:
    """Random uint8 volumes and token ids: PROMPT_TOKENS, the image slot, then report tokens."""
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    pre = min(PROMPT_TOKENS, text_tokens // 2)
    ids = torch.randint(3, vocab, (micro_batch, text_tokens), device=device)
    slot = torch.full((micro_batch, 1), IMAGE_TOKEN_ID, device=device)
    input_ids = torch.cat([ids[:, :pre], slot, ids[:, pre:]], 1)
    labels = input_ids.clone()
    labels[:, : pre + 1] = IGNORE_INDEX
    hr = torch.randint(
        0, 256, (micro_batch, 1, *model.cfg.resolution.hr_size), dtype=torch.uint8, device=device
    )
    return {"hr": hr, "input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, warmup: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Run ``step()`` warmup + steps times; median/min ms of the timed ones and peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_gib = torch.cuda.memory_allocated(device) / GIB  # weights (+ any leftover of earlier rows)
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - t0))
    _sync(device)
    ms = [s.elapsed_time(e) for s, e in times] if device.type == "cuda" else times
    out: dict[str, Any] = {"ms": statistics.median(ms), "ms_min": min(ms)}
    if device.type == "cuda":
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        out["start_alloc_gib"] = start_gib
    return out


def _release(params: list[nn.Parameter], device: torch.device) -> None:
    for p in params:
        p.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(fn, params: list[nn.Parameter], device: torch.device) -> dict[str, Any]:
    """``fn()`` with OOM caught: {"status": "OOM"}; memory and grads released either way."""
    oom = None
    try:
        result = fn()
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0][:160]
    _release(params, device)
    if oom is not None:
        return {"status": "OOM", "error": oom}
    return {"status": "ok", **result}


def _adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def measure_step(model: HiltReportModel, batch: dict, warmup: int, steps: int, device) -> dict[str, Any]:
    """Full training step in plain torch: model(batch) -> loss, backward, AdamW."""
    params = [p for _, p in model.trainable_parameters()]
    opt = _adamw(params)
    losses = []

    def step() -> None:
        loss = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    out = time_steps(step, warmup, steps, device)
    out["loss"] = float(losses[-1])
    return out


def measure_deepspeed(
    model: HiltReportModel, batch: dict, warmup: int, steps: int, device, ds_path: str, micro_batch: int
) -> dict[str, Any]:
    """The same step through deepspeed.initialize with ``ds_path`` (filled as train.py fills it)."""
    from hilt_scale.training.config import TrainConfig  # noqa: PLC0415
    from hilt_scale.training.distributed import ds_values, fill_ds_config, setup_distributed  # noqa: PLC0415

    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # keep --threads on CPU
    setup_distributed()
    import deepspeed  # noqa: PLC0415

    tcfg = TrainConfig(micro_batch=micro_batch, total_batch=micro_batch, lr=1e-4)
    values = ds_values(tcfg, world=1, total_steps=warmup + steps)
    # torch AdamW in both modes: the difference is the engine, not the optimizer kernel (and
    # FusedAdam would JIT-compile with nvcc, which the GPU image may lack).
    values["torch_adam"] = True
    values["bf16.enabled"] = model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    ds_cfg = fill_ds_config(ds_path, values)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for _, p in model.trainable_parameters()], config=ds_cfg
    )

    def step() -> None:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

    try:
        return time_steps(step, warmup, steps, device)
    finally:
        if hasattr(engine, "destroy"):
            engine.destroy()


def measure_vit(vision: nn.Module, size, micro_batch: int, dtype, warmup: int, steps: int, device):
    """ViT alone on one view: forward, a mean-square loss, backward, AdamW over the ViT."""
    x = torch.rand(micro_batch, 1, *size, device=device, dtype=dtype) * 2 - 1
    opt = _adamw(list(vision.parameters()))

    def step() -> None:
        vision(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, warmup, steps, device)


def measure_llm(llm: nn.Module, seq: int, micro_batch: int, warmup: int, steps: int, device):
    """LLM alone on random input embeddings of the step's length (grad to the inputs, as the
    visual tokens get), labels on the report part, backward, AdamW over LoRA."""
    weight = llm.get_input_embeddings().weight
    embeds = (torch.randn(micro_batch, seq, weight.shape[1], device=device) * 0.02).to(weight.dtype)
    embeds.requires_grad_(True)
    labels = torch.randint(3, weight.shape[0], (micro_batch, seq), device=device)
    labels[:, : seq // 8] = IGNORE_INDEX
    mask = torch.ones(micro_batch, seq, dtype=torch.long, device=device)
    opt = _adamw([p for p in llm.parameters() if p.requires_grad])

    def step() -> None:
        llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        embeds.grad = None

    return time_steps(step, warmup, steps, device)


def run_grid(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, on_row=None
) -> list[dict[str, Any]]:
    """All rows: connectors x checkpointing x micro-batch (+ parts, + DeepSpeed rows)."""
    rows: list[dict[str, Any]] = []
    sets = [f"llm.dtype={'bfloat16' if dtype == torch.bfloat16 else 'float32'}", *args.set]
    cfgs = {c: model_config(args.vision, c, args.llm, args.resolution, sets) for c in args.connectors}
    any_cfg = next(iter(cfgs.values()))
    reason = skip_reason(any_cfg, device)
    grid = [(c, ck, mb) for c in args.connectors for ck in args.checkpointing for mb in args.micro_batch]
    if reason:
        return [row_stub(cfgs[c], c, ck, mb, "torch", "skipped", reason) for c, ck, mb in grid]
    if args.memory_cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * GIB / total), device)
    t0 = time.perf_counter()
    llm = build_bench_llm(any_cfg, device)
    gc.collect()
    gc.freeze()  # the imports and the LLM stay: later gc.collect() calls scan only new objects (~1 s -> ms)
    build_s = time.perf_counter() - t0
    print(
        f"# built {any_cfg.llm.name} ({any_cfg.llm.quantization}) on {device} in {build_s:.1f} s", flush=True
    )
    parts_cache: dict[tuple, dict] = {}
    for engine in ["torch", *(["deepspeed"] if args.via_deepspeed else [])]:
        for c, ck, mb in grid:
            cfg = cfgs[c]
            if engine == "deepspeed":  # a fresh LLM: ZeRO leaves hooks and flat buffers on its params
                gc.unfreeze()  # let the old LLM's cycles be collected
                del llm
                _release([], device)
                llm = build_bench_llm(any_cfg, device)
                gc.collect()
                gc.freeze()
            model = assemble(cfg, llm, device, dtype)
            set_checkpointing(model, ck == "on")
            row = row_stub(cfg, c, ck, mb, engine, "ok", "", model=model, text_tokens=args.text_tokens)
            params = [p for _, p in model.trainable_parameters()]
            batch = synthetic_batch(model, mb, args.text_tokens, device)
            if engine == "torch":
                fn = functools.partial(measure_step, model, batch, args.warmup, args.steps, device)
            else:
                fn = functools.partial(
                    measure_deepspeed, model, batch, args.warmup, args.steps, device, args.ds, mb
                )
            res = guarded(fn, params, device)
            row.update(status=res.pop("status"), note=res.pop("error", ""), **res)
            if engine == "torch" and args.parts:
                row.update(measure_parts(model, row, mb, dtype, args, device, parts_cache))
            del model, batch, params, fn
            _release([], device)
            rows.append(finish_row(row, args))
            if on_row is not None:
                on_row(rows)
            print(format_table([rows[-1]], header=len(rows) == 1), flush=True)
    gc.unfreeze()
    return rows


def measure_parts(model, row, mb, dtype, args, device, cache) -> dict[str, Any]:
    """ViT on HR, ViT on LR, LLM with this connector's visual tokens; cached across rows."""
    out: dict[str, Any] = {}
    res = model.cfg.resolution
    is2d = model.cfg.connector.kind == "2d"
    jobs = []
    if model.connector.needs_hr:
        jobs.append(("vit_hr", (is2d, "hr", row["ckpt"], mb), lambda: measure_vit(model.vision, res.hr_size, mb, dtype, args.warmup, args.steps, device)))  # fmt: skip
    if model.connector.needs_lr:
        jobs.append(("vit_lr", (is2d, "lr", row["ckpt"], mb), lambda: measure_vit(model.vision, res.lr_size, mb, dtype, args.warmup, args.steps, device)))  # fmt: skip
    jobs.append(("llm", ("llm", row["seq_len"], row["ckpt"], mb), lambda: measure_llm(model.llm, row["seq_len"], mb, args.warmup, args.steps, device)))  # fmt: skip
    for name, key, fn in jobs:
        if key not in cache:
            params = [p for p in model.parameters() if p.requires_grad]
            cache[key] = guarded(fn, params, device)
        got = cache[key]
        out[f"{name}_ms"] = got.get("ms") if got["status"] == "ok" else "OOM"
        if got["status"] == "ok" and "peak_alloc_gib" in got:
            out[f"{name}_peak_gib"] = got["peak_alloc_gib"]
    return out


def row_stub(cfg, connector, ckpt, mb, engine, status, note, model=None, text_tokens=0) -> dict[str, Any]:
    row = {
        "connector": connector, "ckpt": ckpt, "micro_batch": mb, "engine": engine,
        "vision": cfg.vision.name, "llm": cfg.llm.name, "quantization": cfg.llm.quantization,
        "hr_size": list(cfg.resolution.hr_size), "status": status, "note": note,
    }  # fmt: skip
    if model is not None:
        row["visual_tokens"] = model.num_visual_tokens
        row["seq_len"] = text_tokens + model.num_image_tokens
    return row


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (
            f"{p.name} ({p.total_memory / GIB:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    return f"CPU {platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hilt_scale.bench_step", description=__doc__.split("\n")[0])
    p.add_argument("--vision", help="vision preset (default vit-base on CUDA, vit-micro on CPU)")
    p.add_argument("--llm", help="LLM preset (default llama3-8b on CUDA, llm-micro on CPU)")
    p.add_argument("--resolution", help="resolution preset (default paper on CUDA, cpu-micro on CPU)")
    p.add_argument("--connectors", default=",".join(CONNECTOR_KINDS), help="comma-separated connector kinds")
    p.add_argument("--checkpointing", default="off,on", help="activation checkpointing settings: off,on")
    p.add_argument("--micro-batch", default="1,2", help="comma-separated micro-batch sizes")
    p.add_argument(
        "--text-tokens", type=int, default=512, help="text tokens per sample besides the visual ones"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument(
        "--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="model config override"
    )
    p.add_argument(
        "--no-parts", dest="parts", action="store_false", help="skip timing ViT HR/LR and LLM alone"
    )
    p.add_argument(
        "--via-deepspeed", action="store_true", help="also time each row through deepspeed.initialize"
    )
    p.add_argument("--ds", default="ds_configs/zero2.json", help="DeepSpeed JSON for --via-deepspeed")
    p.add_argument(
        "--memory-cap-gib", type=float, help="cap this process's CUDA memory (emulate a smaller GPU)"
    )
    p.add_argument(
        "--loader-samples-per-s", type=float, help="loader samples/s per worker: adds workers needed"
    )
    p.add_argument("--out", help="directory for bench_step.md / .json / .png")
    p.add_argument("--name", default="bench_step", help="file stem under --out")
    p.add_argument("--from-json", help="re-render table/PNG from an earlier JSON instead of measuring")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1, help="CPU only: torch threads (tiny ops only contend)")
    args = p.parse_args(argv)
    args.connectors = [c for c in args.connectors.split(",") if c]
    bad = [c for c in args.connectors if c not in CONNECTOR_KINDS]
    if bad:
        p.error(f"unknown connectors {bad}; expected {CONNECTOR_KINDS}")
    args.checkpointing = [c for c in args.checkpointing.split(",") if c]
    if any(c not in ("off", "on") for c in args.checkpointing):
        p.error("--checkpointing takes off, on or off,on")
    args.micro_batch = [int(m) for m in args.micro_batch.split(",") if m]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: measure (or re-render) and print the table, then one JSON line."""
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["rows"] = [finish_row(r, args) for r in result["rows"]]
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
        for k, v in defaults.items():
            setattr(args, k, getattr(args, k) or v)
        use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
        dtype = torch.bfloat16 if use_bf16 else torch.float32
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        result = {
            "device": device_line(device),
            "command": "python -m hilt_scale.bench_step " + " ".join(argv if argv is not None else sys.argv[1:]),
            "vision": args.vision, "llm": args.llm, "resolution": args.resolution,
            "dtype": str(dtype).removeprefix("torch."), "text_tokens": args.text_tokens,
            "warmup": args.warmup, "steps": args.steps,
        }  # fmt: skip

        def partial(rows: list[dict[str, Any]]) -> None:  # files after every row: a timeout keeps them
            if args.out:
                save(args, {**result, "rows": rows, "partial": True})

        result["rows"] = run_grid(args, device, dtype, partial)
        result["seconds"] = round(time.perf_counter() - t0, 1)
    result["loader_samples_per_s_per_worker"] = args.loader_samples_per_s or result.get(
        "loader_samples_per_s_per_worker"
    )
    result.pop("partial", None)
    md, title = save(args, result)
    print("\n" + md)
    if args.out:
        print(plot(result["rows"], Path(args.out) / f"{args.name}.png", title))
    print(json.dumps(result, default=str))
    return result


def save(args: argparse.Namespace, result: dict[str, Any]) -> tuple[str, str]:
    """Targets into ``result``; the Markdown (and with --out the .md and .json files); (md, title)."""
    result["targets"] = targets(result["rows"])
    title = f"{result['vision']} + {result['llm']} at {result['resolution']}, {result['dtype']}: {result['device']}"
    flag = " (partial: the run stopped before its last row)" if result.get("partial") else ""
    md = f"{title}{flag}\n\n{format_table(result['rows'])}\n\ntargets: {json.dumps(result['targets'])}\n"
    if args.out:
        write_text_atomic(Path(args.out) / f"{args.name}.md", md)
        write_json_atomic(Path(args.out) / f"{args.name}.json", result)
    return md, title


if __name__ == "__main__":
    main()
