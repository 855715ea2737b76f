"""Tables, targets and the PNG of ``python -m hilt_scale.bench_step`` (rows are plain dicts)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from hilt_scale.model.config import CONNECTOR_KINDS
from shards.io import write_bytes_atomic


def finish_row(row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Derived columns: samples/s, step / parts, fits in 80 GB, loader workers needed."""
    if row["status"] != "ok":
        return row
    row["samples_per_s"] = row["micro_batch"] / (row["ms"] / 1000)
    parts = [row.get(k) for k in ("vit_hr_ms", "vit_lr_ms", "llm_ms") if k in row]
    if parts and all(isinstance(p, float) for p in parts):
        row["parts_ms"] = sum(parts)
        row["step_over_parts"] = row["ms"] / row["parts_ms"]
    if "peak_reserved_gib" in row:
        row["fits_80gb"] = row["peak_reserved_gib"] <= 79.0  # an H100 80GB shows ~79.2 GiB to torch
    if args.loader_samples_per_s:
        row["loader_workers"] = math.ceil(row["samples_per_s"] / args.loader_samples_per_s)
    return row


def _f(v: Any, digits: int = 1) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


COLUMNS = [
    ("connector", "connector", 0), ("ckpt", "ckpt", 0), ("mb", "micro_batch", 0), ("engine", "engine", 0),
    ("visual tok", "visual_tokens", 0), ("seq", "seq_len", 0), ("step ms", "ms", 1),
    ("samples/s", "samples_per_s", 2), ("peak alloc GiB", "peak_alloc_gib", 1),
    ("peak reserved GiB", "peak_reserved_gib", 1), ("ViT HR ms", "vit_hr_ms", 1),
    ("ViT LR ms", "vit_lr_ms", 1), ("LLM ms", "llm_ms", 1), ("step/parts", "step_over_parts", 2),
    ("loader workers", "loader_workers", 0), ("status", "status", 0),
]  # fmt: skip


def format_table(rows: list[dict[str, Any]], header: bool = True) -> str:
    """Markdown rows (with the header when ``header``); a non-ok row shows its reason."""
    lines = []
    if header:
        lines.append("| " + " | ".join(c for c, _, _ in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = [_f(r.get(k), d) for _, k, d in COLUMNS]
        if r.get("note"):
            cells[-1] = f"{r['status']}: {r['note']}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets read off the rows (micro-batch 1, plain torch)."""
    pick = {(r["connector"], r["ckpt"]): r for r in rows if r["micro_batch"] == 1 and r["engine"] == "torch"}
    out: dict[str, Any] = {}
    for ck in ("off", "on"):
        h, a = pick.get(("hilt", ck)), pick.get(("all-tokens", ck))
        if h and h["status"] == "ok":
            out[f"hilt_ckpt_{ck}_peak_gib"] = h.get("peak_alloc_gib")
            out[f"hilt_ckpt_{ck}_step_over_parts"] = h.get("step_over_parts")
            if a:
                ok = a["status"] == "ok"
                out[f"all_tokens_over_hilt_time_ckpt_{ck}"] = a["ms"] / h["ms"] if ok else a["status"]
                if ok and h.get("peak_alloc_gib"):
                    out[f"all_tokens_over_hilt_memory_ckpt_{ck}"] = a["peak_alloc_gib"] / h["peak_alloc_gib"]
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> str:
    """Step time and peak memory against visual tokens, one colour per connector (Fig 1)."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "no PNG: matplotlib is not installed (rerun with --from-json where it is)"
    import io  # noqa: PLC0415

    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = {c: f"C{i}" for i, c in enumerate(CONNECTOR_KINDS)}
    markers = {("off", 1): "o", ("on", 1): "s", ("off", 2): "^", ("on", 2): "D"}
    has_mem = any(r.get("peak_alloc_gib") for r in rows)
    for r in rows:
        if r["engine"] != "torch" or "visual_tokens" not in r:
            continue
        kw = {
            "color": colours.get(r["connector"], "k"),
            "marker": markers.get((r["ckpt"], r["micro_batch"]), "x"),
        }
        if r["status"] == "ok":
            axes[0].scatter(r["visual_tokens"], r["ms"], s=42, **kw)
            if has_mem:
                axes[1].scatter(r["visual_tokens"], r["peak_alloc_gib"], s=42, **kw)
        elif r["status"] == "OOM":
            for ax in axes:
                ax.scatter(r["visual_tokens"], 1.0, transform=ax.get_xaxis_transform(), s=60, **kw)
                ax.annotate("OOM", (r["visual_tokens"], 0.96), xycoords=("data", "axes fraction"),
                            color=kw["color"], ha="center", va="top", fontsize=7)  # fmt: skip
    for ax, ylabel, name in (
        (axes[0], "step ms (median)", "step time"),
        (axes[1], "peak GiB (allocated)", "peak memory"),
    ):
        ax.set(xscale="log", xlabel="visual tokens", ylabel=ylabel, title=name)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    if not has_mem:
        axes[1].text(0.5, 0.5, "no CUDA: peak memory not measured", ha="center", transform=axes[1].transAxes)
    seen = sorted({r["connector"] for r in rows}, key=list(CONNECTOR_KINDS).index)
    handles = [Line2D([], [], ls="", marker="o", color=colours[c], label=c) for c in seen]
    handles += [
        Line2D([], [], ls="", marker=m, color="grey", label=f"ckpt {ck}, mb {mb}")
        for (ck, mb), m in markers.items()
    ]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.subplots_adjust(left=0.06, right=0.84, wspace=0.25, top=0.86, bottom=0.13)
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return f"wrote {path}"
