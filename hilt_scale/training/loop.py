"""The training loop: build, (resume), then per optimizer step: micro-batches, log, checkpoint
every K, evaluate every E; at the end checkpoint, evaluate, export, summarise.

``run(cfg)`` is what ``hilt_scale/train.py`` calls after parsing; it returns the summary on rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hilt_scale.info import package_versions
from hilt_scale.model.config import ModelConfig, apply_overrides, model_config
from hilt_scale.training import preempt
from hilt_scale.training.config import TrainConfig
from hilt_scale.training.data import (
    check_hr_size,
    constant_report,
    eval_splits,
    length_plan,
    prepare_data,
    split_reports,
)
from hilt_scale.training.distributed import (
    agreed_error,
    barrier,
    ds_values,
    fill_ds_config,
    grad_accum,
    seed_everything,
    setup_distributed,
)


def run_model_config(cfg: TrainConfig) -> ModelConfig:
    """The run's model config: presets named by the run, then its ``--set`` overrides (built once)."""
    return model_config(cfg.vision, cfg.connector, cfg.llm, cfg.resolution, list(cfg.set))


def build_run_model(cfg: TrainConfig, mcfg: ModelConfig, tokenizer_dir: str | None) -> Any:
    """The model of ``mcfg``, with the run's trained tokenizer when the LLM brings none."""
    from hilt_scale.model.mllm import build_model

    if tokenizer_dir:
        mcfg = apply_overrides(mcfg, {"llm.tokenizer_path": tokenizer_dir})
    torch.manual_seed(cfg.seed)  # ViT + connector init
    return build_model(mcfg)


def eval_inputs(
    path: str, cfg: TrainConfig, rank: int, world: int, skipped: Counter | None = None
) -> Iterator[Any]:
    """This rank's eval batches: the first ``eval_limit`` volumes of the split (0 = all) dealt
    round-robin, read one batch at a time. Every rank yields the same number of items (ZeRO-3
    needs equal forward counts); a rank with no volumes left yields None.

    ``--on-error skip``: a volume that cannot be read is left out and counted in ``skipped`` by reason; the
    good volumes of its batch are kept. ``raise``: every rank raises the first bad volume's error
    together (one small collective per batch), so no rank is left waiting in a collective.
    """
    from hilt_scale.training.distributed import first_error
    from shards.batch import stack_batch
    from shards.ingest import DataError
    from shards.read import ShardSet

    shard_set = ShardSet(path)
    entries = shard_set.entries(cfg.eval_split)[: cfg.eval_limit or None]
    mine, size = entries[rank::world], cfg.eval_batch
    for i in range(math.ceil(math.ceil(len(entries) / world) / size)):
        samples, err = [], None
        for entry in mine[i * size : (i + 1) * size]:
            try:
                samples.append(shard_set.read(*entry))
            except DataError as exc:
                if cfg.on_error == "raise":
                    err = str(exc)
                    break
                if skipped is not None:
                    skipped[exc.reason] += 1
        if cfg.on_error == "raise":
            err = first_error(err)
            if err is not None:
                raise DataError(f"evaluation volume of {path}: {err} (--on-error skip leaves it out)")
        yield stack_batch(samples) if samples else None


def evaluate(
    engine: Any,
    cfg: TrainConfig,
    eval_path: str,
    step: int,
    rank: int,
    world: int,
    skipped: Counter | None = None,
) -> dict | None:
    """Generate reports for the eval split on all ranks, gather on rank 0, score, write predictions."""
    import torch.distributed as dist

    from hilt_scale.training import zero3_eval

    t0 = time.perf_counter()
    model = engine.module
    plan = None
    if engine.zero_optimization_stage() == 3:  # a plain replica per rank where it fits (measured)
        plan = zero3_eval.replica_plan(model)
        if plan["mode"] == "replica":
            model = zero3_eval.build_replica(model)
    # Sharded parameters without a replica: every rank joins every forward; synced_gpus keeps a
    # rank whose reports ended early stepping until all have, and an idle rank generates for a dummy.
    lockstep = plan is not None and plan["mode"] != "replica"
    kwargs = {"synced_gpus": True} if lockstep and world > 1 else {}
    hr_size = tuple(model.cfg.resolution.hr_size)
    records = []
    for batch in eval_inputs(eval_path, cfg, rank, world, skipped):
        if batch is None and not lockstep:
            continue
        hr = batch["hr"] if batch is not None else torch.zeros((1, 1, *hr_size), dtype=torch.uint8)
        texts = model.generate(hr, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, **kwargs)
        # The finding head's reading (scored as head_auc_*): what the vision path knows, apart
        # from what the LLM writes.
        probs = [None] * len(texts)
        if getattr(model, "finding_head", None) is not None:
            was_training = model.training
            model.eval()
            probs = [[round(x, 5) for x in row] for row in model.finding_probabilities(hr).tolist()]
            model.train(was_training)
        if batch is not None:
            records += [
                {"key": k, "reference": r, "generated": g, **dataset_labels(m), **({"finding_probs": p} if p else {})}
                for k, r, g, m, p in zip(batch["key"], batch["report"], texts, batch["meta"], probs)
            ]
    if model is not engine.module:
        model = None
        zero3_eval.free_memory()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, records)
    generate_s = round(time.perf_counter() - t0, 2)  # generation on all ranks, gathered
    if rank != 0:
        return None
    records = sorted((r for part in gathered for r in part), key=lambda r: r["key"])
    from hilt_scale.evaluation.scoring import evaluate_records
    from shards.io import write_jsonl_atomic

    write_jsonl_atomic(Path(cfg.out) / "predictions.jsonl", records)
    scores = evaluate_records(records, ce_model=cfg.ce_model)
    zero3 = {"zero3_eval": plan} if plan else {}
    return {"step": step, "n": len(records), "generate_s": generate_s, **scores, **zero3}


def dataset_labels(meta: dict) -> dict:
    """``{"labels": {class: 0/1}}`` from a sample's shard metadata when it has all 18, else {}."""
    from shards.schema import CLASSES

    labels = meta.get("labels") or {}
    return {"labels": {c: int(labels[c]) for c in CLASSES}} if all(c in labels for c in CLASSES) else {}


def nonempty(collate: Any) -> Any:
    """``collate`` for batches with samples; an empty batch (all skipped) is passed on as is."""
    return lambda batch: collate(batch) if len(batch["key"]) else batch


class Batches:
    """Endless micro-batches over epochs; the loader itself keeps the exact (epoch, position)."""

    def __init__(self, loader: Any, trace: bool = False, meter: Any = None):
        self.loader = loader
        self.it = iter(loader)
        self.seen: list[str] | None = [] if trace else None
        self.meter = meter  # a runlog.StepMeter: told each batch and the wait for it

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def next(self) -> dict:
        """The next non-empty micro-batch; a DataError (``no_good_samples``, skips counted by reason)
        when a whole pass over this rank's samples gave none, instead of spinning forever."""
        from shards.ingest import DataError

        t0 = time.perf_counter()
        empty, ends = 0, 0
        whole_pass = len(self.loader) if hasattr(self.loader, "__len__") else None
        while True:
            try:
                batch = next(self.it)
            except StopIteration:  # the loader moved itself to the next epoch
                ends += 1
                if ends > 1:  # a whole epoch went by in this call without a good batch
                    batch = None
                else:
                    self.it = iter(self.loader)
                    continue
            if batch is not None and len(batch["key"]):  # under --on-error skip, empty = all skipped
                break
            empty += 1
            if batch is None or (whole_pass is not None and empty >= whole_pass):
                root = getattr(getattr(self.loader, "shard_set", None), "root", "<loader>")
                raise DataError(
                    "no_good_samples", root, "-",
                    f"a whole pass ({empty} batches) over this rank's samples gave no readable sample; "
                    f"skipped by reason: {dict(getattr(self.loader, 'skipped', {}))}",
                )  # fmt: skip
        if self.meter is not None:
            self.meter.batch(batch, time.perf_counter() - t0)
        if self.seen is not None:
            self.seen += batch["key"]
        return batch


def next_batch(batches: Batches) -> dict:
    """The next micro-batch; a rank out of good samples stops every rank with its DataError
    (collective), so none waits in a collective."""
    import torch.distributed as dist

    from shards.ingest import DataError

    batch, err = None, None
    try:
        batch = batches.next()
    except DataError as exc:
        err = f"rank {dist.get_rank()}: {exc}"
    err = agreed_error(err)
    if err is not None:
        raise DataError(err)
    return batch


def train_step(engine: Any, batches: Batches, accum: int) -> tuple[float, dict[str, float]]:
    """One optimizer step = ``accum`` micro-batches; returns the mean loss over them and all ranks,
    and the mean of the loss's parts (the auxiliary finding loss when the model has one)."""
    import torch.distributed as dist

    total, findings = torch.zeros(()), torch.zeros(())
    for _ in range(accum):
        loss = engine(next_batch(batches))
        engine.backward(loss)
        engine.step()
        total += loss.detach().float().cpu()
        aux = getattr(engine.module, "last_findings_loss", None)
        if aux is not None:
            findings += aux.float().cpu()
    sums = torch.stack([total, findings]) / accum
    dist.all_reduce(sums)
    loss, findings_loss = (sums / dist.get_world_size()).tolist()
    parts = {"findings_loss": findings_loss} if getattr(engine.module, "finding_head", None) is not None else {}
    return loss, parts


def run(cfg: TrainConfig) -> dict | None:
    """Train, evaluate, export; return the summary on rank 0."""
    t_start = time.perf_counter()
    rank, world, local = setup_distributed()
    import deepspeed

    from hilt_scale.training import checkpoint
    from hilt_scale.training.runlog import RunLog, StepMeter, plot_curves, score_table
    from shards.io import lock_dir, write_json_atomic
    from shards.read import ShardLoader

    out = Path(cfg.out)
    _lock = lock_dir(out, "hilt_scale.train") if rank == 0 else None  # one trainer per --out, until exit
    mcfg = run_model_config(cfg)
    data_path, tokenizer_dir = prepare_data(cfg, mcfg, rank, local)
    eval_path = cfg.eval_data or data_path
    check_hr_size(mcfg, data_path, eval_path)  # shards at another HR size: refused before any build
    if cfg.eval and cfg.ce_model:  # missing classifier files: refused before training, not after
        from hilt_scale.evaluation.radbert import classifier_files

        classifier_files(cfg.ce_model)
    final_split, select_split = eval_splits(eval_path, cfg.eval_split)
    seed_everything(cfg.seed)
    model = build_run_model(cfg, mcfg, tokenizer_dir)
    # Generation length from the data, checked against the sequence budget (truncation counted).
    report_skipped: Counter = Counter()  # reports left out under --on-error skip, by reason
    train_reports = split_reports(data_path, "train", cfg.on_error, report_skipped)  # lengths; the baseline
    lengths = length_plan(train_reports, model.collator(), cfg.max_new_tokens)
    cfg = dataclasses.replace(cfg, eval_split=final_split, max_new_tokens=lengths["max_new_tokens"])
    for warning in lengths["warnings"] if rank == 0 else []:
        print(f"warning: {warning}")
    loader = ShardLoader(
        data_path, split="train", batch_size=cfg.micro_batch, shuffle=True, seed=cfg.seed,
        rank=rank, world_size=world, num_workers=cfg.num_workers, collate_fn=nonempty(model.collator()),
        on_error=cfg.on_error,
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
    ckpt_dir = out / "checkpoints"
    say = print if rank == 0 else (lambda _msg: None)
    resume = cfg.resume or bool(cfg.resume_tag)
    warmup = None  # a resumed run's checkpoint already holds the warmed vision path
    if cfg.vision_warmup_steps and not (resume and (cfg.resume_tag or checkpoint.pointer_tag(ckpt_dir))):
        from hilt_scale.training.warmup import warm_up_vision

        warmup = warm_up_vision(model, cfg, data_path, rank, world, say)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)

    meter = StepMeter(model, world)  # telemetry: tokens/s, data wait, memory, FLOPs, MFU
    step, batches = 0, Batches(loader, cfg.trace_keys, meter)
    identity = checkpoint.run_identity(cfg, mcfg, data_path, world, engine.zero_optimization_stage())
    allow = tuple(cfg.allow_change)
    loaded = (
        checkpoint.load(engine, ckpt_dir, identity, say, cfg.resume_tag or None, allow) if resume else None
    )
    saved_step = None  # the step of the checkpoint on disk: never saved again (no rewrite in place)
    if loaded is not None:
        client, trainer = loaded  # checkpoint.load already refused a changed run identity
        step = saved_step = client["step"]
        loader.load_state_dict(trainer["loader"])
        loader.skipped.update(trainer.get("skipped", {}))
        batches = Batches(loader, cfg.trace_keys, meter)
        checkpoint.set_rng_state(trainer["rng"])

    def save() -> None:
        nonlocal saved_step
        if step == saved_step:  # e.g. resuming a finished run: that checkpoint is already on disk
            return
        client = {"step": step, "world": world, "config": dataclasses.asdict(cfg)}
        trainer = {
            "loader": loader.state_dict(),
            "rng": checkpoint.rng_state(),
            "skipped": dict(loader.skipped),
        }
        checkpoint.save(engine, ckpt_dir, step, client, trainer, cfg.keep_checkpoints, identity)
        saved_step = step

    eval_skipped: Counter = Counter()
    eval_errors: list[str] = []

    def safe_evaluate(split: str | None = None) -> dict | None:
        """Evaluate; a failure is recorded (summary.json) instead of costing the export and summary."""
        eval_skipped.clear()  # summary.json counts the skips of the last evaluation
        try:
            run_cfg = dataclasses.replace(cfg, eval_split=split) if split else cfg
            return evaluate(engine, run_cfg, eval_path, step, rank, world, eval_skipped)
        except Exception as exc:
            eval_errors.append(f"step {step}: {type(exc).__name__}: {exc}")
            say(f"evaluation at step {step} failed: {type(exc).__name__}: {exc}")
            return None

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
        log.print(meter.describe())
    scores, stopped = None, None
    stop = preempt.StopRequest().install()  # SIGTERM / SIGINT / SIGUSR1: finish the step, save, stop
    with log:
        while step < total and stopped is None:
            t0 = time.perf_counter()
            loss, parts = train_step(engine, batches, accum)
            step_s = time.perf_counter() - t0
            step += 1
            telemetry = meter.step(step_s)  # collective: every rank, every step
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {step}; {ckpt_dir / checkpoint.POINTER} still names the last "
                    f"finite checkpoint {checkpoint.pointer_tag(ckpt_dir)} (--resume-tag picks an older one)"
                )
            lr = scheduler.get_last_lr()[0] if scheduler is not None else cfg.lr
            log.step(step, loss, lr, cfg.total_batch / step_s, batches.epoch, telemetry, parts)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save()
            if cfg.eval and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                scores = safe_evaluate(select_split)  # model selection: never the test split
                log.eval(step, scores or {})
            stopped = stop.check(step)
        save()
    stop.restore()
    if stopped is not None:
        preempt.leave(stopped, out, step, rank, checkpoint.latest_tag(ckpt_dir) if rank == 0 else None)
    if batches.seen is not None:
        write_json_atomic(out / f"keys.rank{rank}.json", batches.seen)
    scores = safe_evaluate() if cfg.eval else None
    if cfg.export:
        # generate preprocesses raw NIfTI exactly as the training shards were (field of view, spacing).
        preprocessing = json.loads((Path(data_path) / "index.json").read_text()).get("preprocessing", {})
        files = {"train_config.json": dataclasses.asdict(cfg), "preprocessing.json": preprocessing}
        checkpoint.export(engine, out / "export", files)
    skipped = {
        "train": _sum_counts(loader.skipped),
        "eval": _sum_counts(eval_skipped),
        "train_reports": dict(report_skipped),  # read by every rank alike: no sum
    }
    if rank != 0:
        _leave_together()
        return None
    try:
        baseline = None
        if scores is not None:
            log.eval(step, scores)
            baseline = baseline_scores(train_reports, cfg)
        plot_curves(out / "metrics.jsonl", out / "curves.png")
        mcfg = model.cfg
        summary = {
            # The paper-table columns that `python -m hilt_scale.score --compare` reads.
            "method": mcfg.connector.kind,
            "hr_size": list(mcfg.resolution.hr_size),
            "visual_tokens": model.num_visual_tokens,
            "llm": mcfg.llm.name,
            "steps": step,
            "world_size": world,
            "wall_s": round(time.perf_counter() - t_start, 1),
            "vision_warmup": warmup,  # --vision-warmup-steps: its steps, seconds, finding loss
            "telemetry": meter.means(),  # per-step throughput, memory, FLOPs, MFU (docs/TRAINING.md)
            "final": scores,
            "baseline_constant_report": baseline,
            "data": data_path,
            "eval_data": eval_path,
            "eval_split": cfg.eval_split,
            "select_split": select_split,
            "report_lengths": lengths,  # model tokens vs the sequence budget; truncated training reports
            "on_error": cfg.on_error,
            "skipped": skipped,  # samples left out under --on-error skip, by reason
            "eval_errors": eval_errors,
            "params": model.param_counts(),  # trainable / total (ZeRO-3: full sizes, not local shards)
            "versions": package_versions(),  # numbers are comparable only with the same stack
        }
        write_json_atomic(out / "summary.json", summary)
        if scores is not None:
            title = f"{Path(eval_path).name}:{cfg.eval_split}, {scores['n']} volumes, step {step}"
            log.console.print(score_table({"model": scores, "constant report": baseline}, title))
        log.console.print(f"run directory: {out}  (wall time {summary['wall_s']:.0f} s)")
        if eval_errors:
            raise SystemExit(
                f"evaluation failed ({'; '.join(eval_errors)}); export and {out / 'summary.json'} were written"
            )
        return summary
    finally:
        _leave_together()


def _leave_together() -> None:
    """All ranks leave the run together and close the process group: a rank that exited while
    rank 0 was still writing the summary could abort in the communication backend's teardown
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def _sum_counts(counts: Counter) -> dict[str, int]:
    """Per-reason counts summed over all ranks (collective)."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(counts))
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return dict(sorted(total.items()))


def baseline_scores(train_reports: list[str], cfg: TrainConfig) -> dict:
    """Scores of always answering the most frequent training report, on the same eval records."""
    from hilt_scale.evaluation.scoring import evaluate_records
    from shards.io import read_jsonl

    report = constant_report(train_reports)
    records = read_jsonl(Path(cfg.out) / "predictions.jsonl")
    # The model's finding probabilities are not the baseline's: it has no head to score.
    records = [{k: v for k, v in r.items() if k != "finding_probs"} | {"generated": report} for r in records]
    return evaluate_records(records, ce_model=cfg.ce_model)
