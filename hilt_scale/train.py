"""Train the HILT report model with DeepSpeed, from one CPU process to ZeRO-3 across nodes.

    deepspeed hilt_scale/train.py --ds ds_configs/zero2.json            # the main job (phantom default)
    deepspeed hilt_scale/train.py --ds ds_configs/zero3.json --data SHARDS --llm llama3-8b ...
    torchrun --nproc_per_node 2 hilt_scale/train.py --ds ds_configs/zero2.json
    python hilt_scale/train.py --ds ds_configs/zero2.json               # one process, no launcher

Without ``--data`` the embedded default (phantom volumes -> shards -> tokenizer) is built once into
a cache directory. The loop: build, (resume), then per optimizer step: micro-batches, log,
checkpoint every K, evaluate every E; at the end checkpoint, evaluate, export, summarise.
"""

# Run as a script, Python puts hilt_scale/ first on sys.path, where our inspect.py and evaluate.py
# would shadow the standard library's inspect and Hugging Face's evaluate: use the project root.
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROJECT_ROOT = Path(_HERE).parent
DEFAULT_CACHE = Path(os.environ.get("HILT_SCALE_CACHE", Path.home() / ".cache" / "hilt-scale"))


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a run needs besides the model config; every field is a CLI flag."""

    ds: str = "ds_configs/zero2.json"
    data: str | None = None  # shard set; None = the embedded phantom default
    eval_data: str | None = None  # shard set to evaluate on (zero-shot transfer); default = --data
    eval_split: str = "valid"
    out: str = "runs/main"
    cache: str = str(DEFAULT_CACHE)
    resume: bool = False
    # Model presets and section.field=value overrides (hilt_scale.config).
    vision: str = "vit-micro"
    connector: str = "hilt"
    llm: str = "llm-tiny"
    resolution: str = "cpu-tiny"
    set: list[str] = field(default_factory=list)
    # Optimisation (paper: AdamW 1e-4, linear schedule, warm-up 0.03, total batch 4 = 2 x 2).
    micro_batch: int = 2
    total_batch: int = 4
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule still spans them)
    seed: int = 0
    num_workers: int = 0
    # Checkpoint / evaluation cadence in optimizer steps (0 = only at the end).
    save_every: int = 0
    eval_every: int = 0
    eval_batch: int = 4
    eval_limit: int = 0  # evaluate on at most this many volumes (0 = all)
    max_new_tokens: int = 160
    num_beams: int = 1
    keep_checkpoints: int = 2
    eval: bool = True  # --no-eval: skip evaluation (and the baseline) entirely
    export: bool = True
    trace_keys: bool = False  # write keys.rank{r}.json: the sample keys each rank trained on, in order
    # Embedded default: phantom size.
    phantom_n: int = 240
    phantom_size: str = ""  # D,H,W; empty = the resolution preset's HR size
    # Activation checkpointing (ViT and/or LLM), e.g. --grad-ckpt vit,llm.
    grad_ckpt: str = ""
    local_rank: int = -1  # appended by the deepspeed launcher


# The embedded default (random-init tiny LLM, 192 training volumes, 2 CPU cores) needs a higher
# learning rate and several epochs instead of the paper's 1e-4 / batch 4, which assume pretrained
# LLM weights. They apply only when --data is absent and the flag is not given explicitly.
PHANTOM_DEFAULTS = {
    "lr": 1e-3,
    "epochs": 30.0,
    "micro_batch": 4,
    "total_batch": 8,
    "eval_every": 0,
    "save_every": 100,
    # Beam 3 as R2Gen / R2GenGPT evaluate: greedy decoding of this small model drifts to the most
    # frequent phrasing; measured on the same checkpoint, beam 3 lifts the text average by ~5 points.
    "num_beams": 3,
}
LLM_TINY_OVERRIDES = ["llm.lora_r=32", "llm.lora_alpha=64", "llm.lora_dropout=0.05"]


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI flags (--micro-batch 2 ...) over TrainConfig's defaults (and the phantom defaults)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kinds = {bool: bool, int: int, float: float, int | None: int}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, "--" + f.name] if "_" in f.name else [flag]
        if f.type is bool:
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "set":
            p.add_argument(
                "--set", dest="set", action="append", default=None, metavar="SECTION.FIELD=VALUE",
                help="override a model config field, e.g. --set llm.lora_r=16 (repeatable)",
            )  # fmt: skip
        else:
            kind = kinds.get(f.type, str)
            p.add_argument(*names, dest=f.name, type=kind, default=None)
    args = vars(p.parse_args(argv))
    given = {k: v for k, v in args.items() if v is not None}
    if "data" not in given:
        given = {**PHANTOM_DEFAULTS, **given}
    return TrainConfig(**given)


# ---------------------------------------------------------------------------------------------
# Distributed setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, int]:
    """Pick DeepSpeed's CPU accelerator + gloo without CUDA, init the process group; (rank, world, local)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # plain `python train.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Share the cores between the ranks of this node instead of oversubscribing them.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, per_node)))
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size(), local


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so runs (and resumed runs) repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


# ---------------------------------------------------------------------------------------------
# DeepSpeed config


def fill_ds_config(path: str | Path, values: dict[str, Any]) -> dict[str, Any]:
    """Load a DeepSpeed JSON and replace every "auto" by ``values[key]``; unknown "auto" keys fail."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"DeepSpeed config {path} does not exist (try ds_configs/zero2.json)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None

    def fill(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, f"{where}.{k}" if where else k) for k, v in node.items()}
        if node == "auto":
            key = where.rsplit(".", 1)[-1]
            if where not in values and key not in values:
                raise KeyError(f"{path}: key {where!r} is 'auto' but train.py has no value for it")
            return values.get(where, values.get(key))
        return node

    return fill(cfg, "")


def ds_values(cfg: TrainConfig, world: int, total_steps: int) -> dict[str, Any]:
    """The numbers the CLI decides for the DeepSpeed config's "auto" slots."""
    on_gpu = torch.cuda.is_available()
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": grad_accum(cfg, world),
        "lr": cfg.lr,
        "warmup_max_lr": cfg.lr,
        "warmup_num_steps": max(1, round(cfg.warmup_ratio * total_steps)),
        "total_num_steps": total_steps,
        "bf16.enabled": on_gpu,  # bf16 on GPU; fp32 on CPU (exact resume, and CPU bf16 is slow)
        "torch_adam": not on_gpu,  # FusedAdam needs CUDA; torch AdamW compiles nothing
    }


def grad_accum(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step so that micro x accum x ranks = total batch."""
    per_step = cfg.micro_batch * world
    if cfg.total_batch % per_step:
        raise ValueError(
            f"--total-batch {cfg.total_batch} is not a multiple of --micro-batch {cfg.micro_batch} x {world} ranks"
        )
    return cfg.total_batch // per_step


# ---------------------------------------------------------------------------------------------
# Data, model, evaluation


def model_overrides(cfg: TrainConfig) -> list[str]:
    """Model config overrides: the tiny-LLM defaults, activation checkpointing flags, then --set."""
    out = list(LLM_TINY_OVERRIDES) if cfg.llm == "llm-tiny" else []
    parts = {p.strip() for p in cfg.grad_ckpt.split(",") if p.strip()}
    unknown = parts - {"vit", "llm"}
    if unknown:
        raise ValueError(f"--grad-ckpt: unknown part(s) {sorted(unknown)}; expected vit and/or llm")
    if "vit" in parts:
        out.append("vision.grad_checkpointing=true")
    if "llm" in parts:
        out.append("llm.grad_checkpointing=true")
    return out + list(cfg.set)


def build_run_model(cfg: TrainConfig, tokenizer_dir: str | None) -> Any:
    """ModelConfig from presets + overrides, tokenizer from ``tokenizer_dir`` when given, then the model."""
    from hilt_scale.config import apply_overrides, model_config
    from hilt_scale.mllm import build_model

    mcfg = model_config(cfg.vision, cfg.connector, cfg.llm, cfg.resolution, model_overrides(cfg))
    if tokenizer_dir and not mcfg.llm.path and not mcfg.llm.tokenizer_path:
        mcfg = apply_overrides(mcfg, {"llm.tokenizer_path": tokenizer_dir})
    torch.manual_seed(cfg.seed)  # ViT + connector init
    model = build_model(mcfg)
    return model


def constant_report(reports: list[str]) -> str:
    """The most frequent training report (ties: the first seen): the constant-report baseline."""
    if not reports:
        raise ValueError("no training reports to pick a constant baseline from")
    return Counter(reports).most_common(1)[0][0]


def eval_batches(path: str, split: str, limit: int, batch: int, rank: int, world: int) -> Any:
    """This rank's eval batches: the first ``limit`` volumes of the split (0 = all) dealt round-robin.

    Every rank yields the same number of items (ZeRO-3 needs equal forward counts); a rank with
    no volumes left yields None. Volumes are read one batch at a time, never all at once.
    """
    from shards.read import ShardSet

    shard_set = ShardSet(path)
    entries = shard_set.entries(split)[: limit or None]
    mine = entries[rank::world]
    for i in range(math.ceil(math.ceil(len(entries) / world) / batch)):
        samples = [shard_set.read(*e) for e in mine[i * batch : (i + 1) * batch]]
        if not samples:
            yield None
            continue
        yield {
            "key": [s["key"] for s in samples],
            "hr": torch.from_numpy(np.stack([s["hr"] for s in samples]))[:, None],
            "report": [s["report"] for s in samples],
        }


def evaluate(engine: Any, cfg: TrainConfig, eval_path: str, step: int, rank: int, world: int) -> dict | None:
    """Generate reports for the eval split on all ranks, gather on rank 0, score, write predictions."""
    import torch.distributed as dist

    model = engine.module
    stage3 = engine.zero_optimization_stage() == 3
    # ZeRO-3: parameters are sharded, so every rank joins every forward; synced_gpus keeps a rank
    # whose reports ended early stepping until all have, and an idle rank generates for a dummy.
    kwargs = {"synced_gpus": True} if stage3 and world > 1 else {}
    hr_size = tuple(model.cfg.resolution.hr_size)
    records = []
    for batch in eval_batches(eval_path, cfg.eval_split, cfg.eval_limit, cfg.eval_batch, rank, world):
        if batch is None and not stage3:
            continue
        hr = batch["hr"] if batch is not None else torch.zeros((1, 1, *hr_size), dtype=torch.uint8)
        texts = model.generate(hr, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, **kwargs)
        if batch is not None:
            records += [
                {"key": k, "reference": r, "generated": g}
                for k, r, g in zip(batch["key"], batch["report"], texts)
            ]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, records)
    if rank != 0:
        return None
    records = sorted((r for part in gathered for r in part), key=lambda r: r["key"])
    from hilt_scale.evaluate import evaluate_records
    from hilt_scale.runlog import write_jsonl_atomic

    write_jsonl_atomic(Path(cfg.out) / "predictions.jsonl", records)
    scores = evaluate_records(records)
    return {"step": step, "n": len(records), **scores}


def prepare_data(cfg: TrainConfig, rank: int, local_rank: int) -> tuple[str, str | None]:
    """Shard set path and tokenizer directory: the cached phantom default or the user's shards."""
    from hilt_scale.config import model_config
    from hilt_scale.defaults import build_default, split_reports, train_tokenizer_dir

    if cfg.data is None:
        if cfg.phantom_size:
            size = tuple(int(x) for x in cfg.phantom_size.split(","))
        else:  # volumes at the model's HR size
            res = model_config(
                cfg.vision, cfg.connector, cfg.llm, cfg.resolution, model_overrides(cfg)
            ).resolution
            size = tuple(res.hr_size)
        # One builder per node; the cache directory appears in one rename, so nodes never race.
        if local_rank == 0:
            build_default(Path(cfg.cache), cfg.phantom_n, size, cfg.seed, log=print if rank == 0 else None)
        _barrier()
        return build_default(Path(cfg.cache), cfg.phantom_n, size, cfg.seed, log=None)
    data = str(cfg.data)
    tokenizer_dir = None
    if cfg.llm == "llm-tiny" and not any(s.startswith("llm.tokenizer_path=") for s in cfg.set):
        tokenizer_dir = str(Path(cfg.out) / "tokenizer")
        if rank == 0 and not Path(tokenizer_dir).exists():
            train_tokenizer_dir(split_reports(data, "train"), Path(tokenizer_dir))
        _barrier()
    return data, tokenizer_dir


# ---------------------------------------------------------------------------------------------
# The run


class Batches:
    """Endless micro-batches over epochs; the loader itself keeps the exact (epoch, position)."""

    def __init__(self, loader: Any, trace: bool = False):
        self.loader = loader
        self.it = iter(loader)
        self.seen: list[str] | None = [] if trace else None

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def next(self) -> dict:
        try:
            batch = next(self.it)
        except StopIteration:  # the loader moved itself to the next epoch
            self.it = iter(self.loader)
            batch = next(self.it)
        if self.seen is not None:
            self.seen += batch["key"]
        return batch


def train_step(engine: Any, batches: Batches, accum: int) -> float:
    """One optimizer step = ``accum`` micro-batches; returns the mean loss over them and all ranks."""
    import torch.distributed as dist

    total = torch.zeros(())
    for _ in range(accum):
        loss = engine(batches.next())
        engine.backward(loss)
        engine.step()
        total += loss.detach().float().cpu()
    total /= accum
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


# Config fields that must match between the checkpoint's run and a resuming one.
RESUME_KEYS = (
    "micro_batch",
    "total_batch",
    "vision",
    "connector",
    "llm",
    "resolution",
    "set",
    "seed",
    "data",
)


def main(argv: list[str] | None = None) -> dict | None:
    """Train, evaluate, export; return the summary on rank 0."""
    cfg = parse_args(argv)
    t_start = time.perf_counter()
    rank, world, local = setup_distributed()
    import deepspeed

    from hilt_scale import checkpoint
    from hilt_scale.runlog import RunLog, plot_curves, score_table, write_json_atomic
    from shards.read import ShardLoader

    out = Path(cfg.out)
    data_path, tokenizer_dir = prepare_data(cfg, rank, local)
    eval_path = cfg.eval_data or data_path
    seed_everything(cfg.seed)
    model = build_run_model(cfg, tokenizer_dir)
    loader = ShardLoader(
        data_path, split="train", batch_size=cfg.micro_batch, shuffle=True, seed=cfg.seed,
        rank=rank, world_size=world, num_workers=cfg.num_workers, collate_fn=model.collator(),
    )  # fmt: skip
    accum = grad_accum(cfg, world)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"{data_path}: {len(loader)} batches per rank cannot fill one step of {accum} micro-batches"
        )
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    ds_config = fill_ds_config(cfg.ds, ds_values(cfg, world, total))
    if not torch.cuda.is_available():  # offload configs on CPU: torch AdamW instead of DeepSpeedCPUAdam
        ds_config.setdefault("zero_force_ds_cpu_optimizer", False)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)

    step, batches = 0, Batches(loader, cfg.trace_keys)
    ckpt_dir = out / "checkpoints"
    loaded = checkpoint.load(engine, ckpt_dir) if cfg.resume else None
    if loaded is not None:
        client, trainer = loaded
        before = client["config"]
        changed = [k for k in RESUME_KEYS if before.get(k) != dataclasses.asdict(cfg).get(k)]
        if changed or client["world"] != world:
            raise ValueError(f"{ckpt_dir}: cannot resume with changed {changed or ['world size']}")
        step = client["step"]
        loader.load_state_dict(trainer["loader"])
        batches = Batches(loader, cfg.trace_keys)
        checkpoint.set_rng_state(trainer["rng"])

    def save() -> None:
        client = {"step": step, "world": world, "config": dataclasses.asdict(cfg)}
        trainer = {"loader": loader.state_dict(), "rng": checkpoint.rng_state()}
        checkpoint.save(engine, ckpt_dir, step, client, trainer, keep=cfg.keep_checkpoints)

    log = RunLog(out, enabled=rank == 0, total_steps=total, start_step=step)
    if rank == 0:
        write_json_atomic(out / "train_config.json", dataclasses.asdict(cfg))
        counts = model.param_counts()
        log.print(
            f"[bold]hilt-scale[/] {world} rank(s), {'cuda' if torch.cuda.is_available() else 'cpu'}, "
            f"ZeRO-{engine.zero_optimization_stage()}, {counts['trainable'] / 1e6:.2f}M trainable of "
            f"{counts['total'] / 1e6:.2f}M, {total} steps x {cfg.total_batch} samples"
            + (f", resumed at step {step}" if step else "")
        )
    scores = None
    with log:
        while step < total:
            t0 = time.perf_counter()
            loss = train_step(engine, batches, accum)
            step += 1
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            lr = scheduler.get_last_lr()[0] if scheduler is not None else cfg.lr
            log.step(step, loss, lr, cfg.total_batch / (time.perf_counter() - t0), batches.epoch)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save()
            if cfg.eval and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                scores = evaluate(engine, cfg, eval_path, step, rank, world)
                log.eval(step, scores or {})
        save()
    if batches.seen is not None:
        write_json_atomic(out / f"keys.rank{rank}.json", batches.seen)
    scores = evaluate(engine, cfg, eval_path, step, rank, world) if cfg.eval else None
    if cfg.export:
        checkpoint.export(engine, out / "export", {"train_config.json": dataclasses.asdict(cfg)})
    if rank != 0:
        return None
    baseline = None
    if scores is not None:
        log.eval(step, scores)
        baseline = baseline_scores(data_path, cfg)
    plot_curves(out / "metrics.jsonl", out / "curves.png")
    mcfg = model.cfg
    summary = {
        # The paper-table columns that `python -m hilt_scale.evaluate --compare` reads.
        "method": mcfg.connector.kind,
        "hr_size": list(mcfg.resolution.hr_size),
        "visual_tokens": model.num_visual_tokens,
        "llm": mcfg.llm.name,
        "steps": step,
        "world_size": world,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "final": scores,
        "baseline_constant_report": baseline,
        "data": data_path,
        "eval_data": eval_path,
        "eval_split": cfg.eval_split,
    }
    write_json_atomic(out / "summary.json", summary)
    if scores is not None:
        title = f"{Path(eval_path).name}:{cfg.eval_split}, {scores['n']} volumes, step {step}"
        log.console.print(score_table({"model": scores, "constant report": baseline}, title))
    log.console.print(f"run directory: {out}  (wall time {summary['wall_s']:.0f} s)")
    return summary


def baseline_scores(data_path: str, cfg: TrainConfig) -> dict:
    """Scores of always answering the most frequent training report, on the same eval records."""
    from hilt_scale.defaults import split_reports
    from hilt_scale.evaluate import evaluate_records
    from hilt_scale.runlog import read_jsonl

    report = constant_report(split_reports(data_path, "train"))
    records = read_jsonl(Path(cfg.out) / "predictions.jsonl")
    return evaluate_records([{**r, "generated": report} for r in records])


if __name__ == "__main__":
    main()
