"""What a training run tells its user: progress bar, metrics.jsonl, TensorBoard, curves PNG, tables.

Only rank 0 creates a ``RunLog`` with ``enabled=True``; the other ranks get a silent one, so the
training loop calls the same methods everywhere and never checks the rank itself.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from hilt_scale.evaluation.metrics import METRIC_NAMES
from shards.io import atomic_write, read_jsonl, write_jsonl_atomic

# The table's rows: the nine text metrics, their average, finding-level F1 (clinical efficacy).
METRIC_COLUMNS = (*METRIC_NAMES, "average", "ce_micro_f1", "ce_macro_f1")
# Further clinical-efficacy rows, shown when an evaluation has them (dataset labels, --ce-model).
EXTRA_CE_ROWS = {
    "ce_labels_micro_f1": "finding F1 micro (labeler vs dataset labels)",
    "ce_labels_macro_f1": "finding F1 macro (labeler vs dataset labels)",
    "radbert_ref_micro_f1": "RadBERT F1 micro (vs classifier on references)",
    "radbert_ref_macro_f1": "RadBERT F1 macro (vs classifier on references)",
    "radbert_labels_micro_f1": "RadBERT F1 micro (vs dataset labels)",
    "radbert_labels_macro_f1": "RadBERT F1 macro (vs dataset labels)",
    "head_auc_macro": "finding head AUC, mean of 18 (vs dataset labels)",
}


class StepMeter:
    """Throughput and cost of each optimizer step (docs/TRAINING.md, "Telemetry").

    ``batch`` is told each micro-batch and how long the loader kept the step waiting for it;
    ``step`` sums them over the ranks (one small all-reduce: every rank calls it each step) and
    returns the step's telemetry row; ``means`` averages the rows for summary.json. Model FLOPs
    come from the configuration (``hilt_scale.training.flops``), MFU from the device's bf16 peak.
    """

    def __init__(self, model: Any, world: int) -> None:
        from hilt_scale.training.flops import llm_shape, peak_bf16_flops  # noqa: PLC0415

        self.cfg = model.cfg
        self.shape = llm_shape(model.llm.config, model.cfg)
        self.visual_per_sample = model.num_image_tokens  # visual (+ finding) tokens in the LLM
        self.world = world
        self.cuda = torch.cuda.is_available()
        self.device_name = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.peak = peak_bf16_flops(self.device_name)
        self.rows: list[dict[str, float]] = []
        self._micro: list[tuple[int, int, int]] = []  # (volumes, padded text length, text tokens)
        self._wait = 0.0

    def describe(self) -> str:
        """One line for the run's start: what MFU is measured against, or why it is omitted."""
        if self.peak is None:
            return (
                f"telemetry: MFU omitted: no bf16 peak known for {self.device_name!r} (set $HILT_PEAK_TFLOPS)"
            )
        return (
            f"telemetry: MFU against {self.peak / 1e12:.0f} TFLOP/s bf16 peak per device ({self.device_name})"
        )

    def batch(self, batch: dict, wait_s: float) -> None:
        """Count one micro-batch: volumes, text tokens (the image placeholder excluded), wait time."""
        mask = batch["attention_mask"]
        n = mask.shape[0]
        self._micro.append((n, mask.shape[1], int(mask.sum()) - n))
        self._wait += wait_s

    def step(self, step_s: float) -> dict[str, float]:
        """The step's telemetry over all ranks (collective); resets the counts."""
        import torch.distributed as dist  # noqa: PLC0415

        from hilt_scale.training.flops import step_flops  # noqa: PLC0415

        flops = step_flops(self.cfg, self.shape, [(n, t) for n, t, _ in self._micro])["total"]
        volumes = sum(n for n, _, _ in self._micro)
        text = sum(x for _, _, x in self._micro)
        device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        sums = torch.tensor([volumes, text, flops, self._wait], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(sums)
        volumes, text, flops, wait = sums.tolist()
        self._micro, self._wait = [], 0.0
        wait /= self.world  # the mean over ranks
        row = {
            "visual_tokens_per_s": volumes * self.visual_per_sample / step_s,
            "text_tokens_per_s": text / step_s,
            "step_time_s": step_s,
            "data_wait_s": wait,
            "data_wait_share": wait / step_s,
            "model_tflop_per_step": flops / 1e12,
            "tflop_per_s_per_device": flops / step_s / self.world / 1e12,
        }
        if self.peak is not None:
            row["mfu"] = flops / step_s / self.world / self.peak
        if self.cuda:
            row["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            torch.cuda.reset_peak_memory_stats()  # the next row shows the next step's peak
        row["cpu_rss_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        self.rows.append(row)
        return row

    def means(self) -> dict[str, Any]:
        """Mean of every telemetry value over the steps, without the first when there are more
        (it pays for allocation and warm-up); ``steps_averaged`` says over how many; the device."""
        rows = self.rows[1:] if len(self.rows) > 1 else self.rows
        out: dict[str, Any] = {"device": self.device_name, "steps_averaged": len(rows)}
        for key in dict.fromkeys(k for r in rows for k in r):
            out[key] = sum(r[key] for r in rows) / len(rows)
        if self.peak is None:
            out["mfu"] = None
            out["mfu_note"] = f"omitted: no bf16 peak known for {self.device_name!r}"
        return out


def telemetry_text(row: dict[str, float]) -> str:
    """The console's short form of a telemetry row."""
    text = (
        f"{row['visual_tokens_per_s']:,.0f} vis + {row['text_tokens_per_s']:,.0f} text tok/s  "
        f"step {row['step_time_s']:.2f} s (data {100 * row['data_wait_share']:.0f} %)  "
        f"RSS {row['cpu_rss_peak_gib']:.1f} GiB"
    )
    if "cuda_max_allocated_gib" in row:
        text += f"  cuda {row['cuda_max_allocated_gib']:.1f}/{row['cuda_max_reserved_gib']:.1f} GiB"
    text += f"  {row['tflop_per_s_per_device']:.3g} TFLOP/s"
    if "mfu" in row:
        text += f"  MFU {100 * row['mfu']:.1f} %"
    return text


class RunLog:
    """Per-step and per-eval logging for one run directory; a no-op when ``enabled`` is False."""

    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.out = Path(out_dir)
        self.enabled = enabled
        self.console = Console(quiet=not enabled, stderr=False)
        self.metrics_path = self.out / "metrics.jsonl"
        self.progress: Progress | None = None
        self.task = None
        self.tb = None
        self._t0 = time.perf_counter()
        self.total_steps = total_steps
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        # On resume, drop rows logged after the checkpoint we restart from: they will be redone.
        if self.metrics_path.exists():
            kept = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= start_step]
            write_jsonl_atomic(self.metrics_path, kept if start_step else [])
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=start_step or None)
        except ImportError:
            self.tb = None
        if not self.console.is_terminal:
            return  # a pipe or CI log: plain lines from step(), never a bar cut to the log's width
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[sps]:.2f} samples/s"
                "  {task.fields[perf]}"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_step, loss=float("nan"), lr=0.0, sps=0.0, perf=""
        )

    def __enter__(self) -> RunLog:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def print(self, *args: Any) -> None:
        """Print through the progress-aware console (rank 0 only)."""
        if self.enabled:
            self.console.print(*args)

    def _append(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        samples_per_s: float,
        epoch: int,
        telemetry: dict[str, float] | None = None,
        parts: dict[str, float] | None = None,
    ) -> None:
        """Record one optimizer step: metrics.jsonl row, TensorBoard scalars, progress bar.

        ``parts`` are named parts of the loss (``findings_loss``: the auxiliary finding loss), in
        the row and in TensorBoard under ``train/``.

        ``telemetry`` (``StepMeter.step``'s row) joins the metrics.jsonl row, goes to TensorBoard
        under ``perf/`` and, shortened, to the console line.
        """
        if not self.enabled:
            return
        telemetry = telemetry or {}
        row = {
            "kind": "train",
            "step": step,
            "epoch": epoch,
            "loss": loss,
            **(parts or {}),
            "lr": lr,
            "samples_per_s": samples_per_s,
            "time_s": round(time.perf_counter() - self._t0, 3),
            **telemetry,
        }
        self._append(row)
        perf = telemetry_text(telemetry) if telemetry else ""
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/samples_per_s", samples_per_s, step)
            for key, value in (parts or {}).items():
                self.tb.add_scalar(f"train/{key}", value, step)
            for key, value in telemetry.items():
                self.tb.add_scalar(f"perf/{key}", value, step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=loss, lr=lr, sps=samples_per_s, perf=perf)
        if not self.console.is_terminal and (step % max(1, self.total_steps // 20) == 0 or step == 1):
            # A pipe or CI log shows no live bar: print a plain line every 5 % of the run instead.
            elapsed = time.perf_counter() - self._t0
            self.console.print(
                f"step {step}/{self.total_steps}  epoch {epoch}  loss {loss:.4f}  "
                + "".join(f"{k} {v:.4f}  " for k, v in (parts or {}).items())
                + f"lr {lr:.2e}  "
                f"{samples_per_s:.1f} samples/s  {perf + '  ' if perf else ''}elapsed {elapsed:.0f} s",
                soft_wrap=True,  # one line per step in the log, whatever the width
            )

    def eval(self, step: int, scores: dict[str, Any]) -> None:
        """Record one evaluation: numeric scores to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        flat = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._append({"kind": "eval", "step": step, **flat})
        if self.tb is not None:
            for k, v in flat.items():
                self.tb.add_scalar(f"eval/{k}", v, step)

    def close(self) -> None:
        """Stop the progress bar and flush TensorBoard."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> None:
    """Draw training loss and evaluation average / CE F1 against step into one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set(title="training loss", xlabel="optimizer step", ylabel="loss")
    axes[0].set_yscale("log")
    for key, label, factor in (
        ("average", "average of 9 metrics", 1),
        ("ce_micro_f1", "finding F1 micro x100", 100),
    ):
        pts = [(r["step"], r[key] * factor) for r in evals if key in r]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=label)
    axes[1].set(title="validation", xlabel="optimizer step", ylabel="score")
    if axes[1].lines:
        axes[1].legend(loc="best")
    fig.tight_layout()
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def score_table(rows: dict[str, dict[str, Any]], title: str) -> Table:
    """A rich table, one row per metric and one column per system (e.g. model vs constant baseline)."""
    table = Table(title=title)
    table.add_column("metric")
    for name in rows:
        table.add_column(name, justify="right")
    names = {
        "average": "average of the 9 (0-100)",
        "ce_micro_f1": "finding F1 micro (CE, 0-1)",
        "ce_macro_f1": "finding F1 macro (CE, 0-1)",
    }
    extra = [k for k in EXTRA_CE_ROWS if any(k in (scores or {}) for scores in rows.values())]
    names.update(EXTRA_CE_ROWS)
    for key in (*METRIC_COLUMNS, *extra):
        cells = []
        for scores in rows.values():
            value = scores.get(key)
            cells.append("n/a" if not isinstance(value, (int, float)) else f"{value:.2f}")
        table.add_row(names.get(key, key), *cells, end_section=key in ("cider", "average"))
    return table
