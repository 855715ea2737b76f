"""What a training run tells its user: progress bar, metrics.jsonl, TensorBoard, curves PNG, tables.

Only rank 0 creates a ``RunLog`` with ``enabled=True``; the other ranks get a silent one, so the
training loop calls the same methods everywhere and never checks the rank itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

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
}


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
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_step, loss=float("nan"), lr=0.0, sps=0.0
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

    def step(self, step: int, loss: float, lr: float, samples_per_s: float, epoch: int) -> None:
        """Record one optimizer step: metrics.jsonl row, TensorBoard scalars, progress bar."""
        if not self.enabled:
            return
        row = {
            "kind": "train",
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "samples_per_s": samples_per_s,
            "time_s": round(time.perf_counter() - self._t0, 3),
        }
        self._append(row)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/samples_per_s", samples_per_s, step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=loss, lr=lr, sps=samples_per_s)
        if not self.console.is_terminal and (step % max(1, self.total_steps // 20) == 0 or step == 1):
            # A pipe or CI log shows no live bar: print a plain line every 5 % of the run instead.
            elapsed = time.perf_counter() - self._t0
            self.console.print(
                f"step {step}/{self.total_steps}  epoch {epoch}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{samples_per_s:.1f} samples/s  elapsed {elapsed:.0f} s"
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
