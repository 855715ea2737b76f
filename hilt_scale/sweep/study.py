"""Finding F1 per physical group on the phantom (HR-only vs LR-visible) and the hr-study's results.

Ground truth and prediction both come from the report text read with
``shards.phantom_report.read_findings`` (the reference states every finding the volume holds, so
its kinds equal the volume's metadata; tests/test_shards_phantom.py checks that). F1 is micro over
(volume, kind) pairs of the group's kinds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from hilt_scale.evaluation.labeler import prf
from shards.phantom_report import HR_ONLY_KINDS, KINDS, LR_VISIBLE_KINDS, read_findings


def _f1(tp: int, fp: int, fn: int) -> float:
    return prf(tp, fp, fn)["f1"]


def group_f1(records: Sequence[dict]) -> dict[str, Any]:
    """``f1_hr_only``, ``f1_lr_visible`` (micro over volume x kind), per-kind F1 and positives."""
    counts = {k: [0, 0, 0] for k in KINDS}  # tp, fp, fn
    for rec in records:
        truth, pred = read_findings(rec["reference"]), read_findings(rec["generated"])
        for k in KINDS:
            c = counts[k]
            c[0] += k in truth and k in pred
            c[1] += k not in truth and k in pred
            c[2] += k in truth and k not in pred
    out: dict[str, Any] = {}
    for name, kinds in (("hr_only", HR_ONLY_KINDS), ("lr_visible", LR_VISIBLE_KINDS)):
        tp, fp, fn = (sum(counts[k][i] for k in kinds) for i in range(3))
        out[f"f1_{name}"] = _f1(tp, fp, fn)
        out[f"positives_{name}"] = tp + fn
    out["f1_per_kind"] = {k: _f1(*c) for k, c in counts.items()}
    return out


def mean_std(values: Sequence[float]) -> dict[str, float | int]:
    """Mean and sample standard deviation (0 for one value) of finite values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


STUDY_METRICS = ("f1_hr_only", "f1_small_nodule", "f1_lr_visible", "ce_micro_f1", "ce_macro_f1", "average")


def study_results(rows: list[dict], baseline: dict | None = None) -> dict[str, Any]:
    """Per variant: visual tokens and mean/std over seeds of the study's metrics."""
    variants: dict[str, dict] = {}
    for row in rows:
        v = variants.setdefault(
            row["axes"].get("connector", row["group"]),
            {"visual_tokens": row.get("visual_tokens"), "seeds": [], "failed_seeds": [], "values": {}},
        )
        if row["status"] == "failed":
            v["failed_seeds"].append(row["seed"])
        if row["status"] != "done":
            continue
        v["seeds"].append(row["seed"])
        v["visual_tokens"] = row.get("visual_tokens")
        for m in STUDY_METRICS:
            v["values"].setdefault(m, []).append(row["scores"].get(m))
    out = {}
    for name, v in variants.items():
        out[name] = {
            "visual_tokens": v["visual_tokens"],
            "seeds": v["seeds"],
            "failed_seeds": v["failed_seeds"],
            **{m: mean_std(v["values"].get(m, [])) for m in STUDY_METRICS},
            "per_seed": v["values"],
        }
    return {"variants": out, "constant_report": baseline}


def study_markdown(results: dict) -> str:
    """The study's table: one row per variant, mean ± std over seeds."""
    head = (
        "| variant | visual tokens | seeds | F1 HR-only | F1 small nodule (HR-only) | F1 LR-visible | F1 micro "
        "| F1 macro | average (9) |"
    )
    lines = [head, "|" + "---|" * 9]

    def cell(d: dict, digits: int = 3) -> str:
        if not d or not d.get("n"):
            return "n/a"
        return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"

    for name, v in results["variants"].items():
        seeds = f"{len(v['seeds'])}" + (f" (+{len(v['failed_seeds'])} failed)" if v["failed_seeds"] else "")
        lines.append(
            f"| {name} | {v['visual_tokens']} | {seeds} | {cell(v['f1_hr_only'])} | {cell(v['f1_small_nodule'])} "
            f"| {cell(v['f1_lr_visible'])} "
            f"| {cell(v['ce_micro_f1'])} | {cell(v['ce_macro_f1'])} | {cell(v['average'], 2)} |"
        )
    b = results.get("constant_report")
    if b:
        lines.append(
            f"| constant report | 0 | - | {b['f1_hr_only']:.3f} | {b['f1_per_kind']['small nodule']:.3f} "
            f"| {b['f1_lr_visible']:.3f} | "
            f"{b.get('ce_micro_f1', float('nan')):.3f} | {b.get('ce_macro_f1', float('nan')):.3f} | "
            f"{b.get('average', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def plot_study(results: dict, path: str) -> None:
    """F1 on HR-only findings (filled) and LR-visible (hollow) against visual tokens, ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, v) in enumerate(results["variants"].items()):
        if not v["f1_hr_only"].get("n"):
            continue
        x = v["visual_tokens"] or 1
        color = f"C{i}"
        ax.errorbar(
            x,
            v["f1_hr_only"]["mean"],
            yerr=v["f1_hr_only"]["std"],
            fmt="o",
            color=color,
            capsize=4,
            label=name,
        )
        ax.errorbar(
            x * 1.06,
            v["f1_lr_visible"]["mean"],
            yerr=v["f1_lr_visible"]["std"],
            fmt="o",
            mfc="none",
            color=color,
            capsize=3,
        )
        ax.annotate(
            name, (x, v["f1_hr_only"]["mean"]), textcoords="offset points", xytext=(6, -10), fontsize=8
        )
    b = results.get("constant_report")
    if b:
        ax.axhline(b["f1_hr_only"], color="grey", ls=":", lw=1, label="constant report (HR-only)")
    xs = [v["visual_tokens"] or 1 for v in results["variants"].values()] or [1]
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    ax.set_xlabel("visual tokens given to the LLM")
    ax.set_ylabel("finding F1 (filled: HR-only, hollow: LR-visible)")
    ax.set_title("Phantom: what HR and LR queries buy (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
