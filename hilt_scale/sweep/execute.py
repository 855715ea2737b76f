"""``--run``: data once per sweep, each run as its own ``python hilt_scale/train.py`` subprocess
(a crash cannot take the sweep down), resume (finished runs are not rerun, stopped ones resume), then the
collected table (seeds as mean ± std) and the experiment's figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from hilt_scale.sweep.grid import EXPERIMENT_TITLES, RunSpec
from hilt_scale.sweep.plan import ROOT
from hilt_scale.sweep.study import group_f1, mean_std
from shards.io import read_jsonl, write_json_atomic, write_text_atomic


def _phantom_raw(
    data: Path, n: int, size: tuple[int, int, int], seed: int, valid_fraction: float, log, lr_factor: int = 2
) -> Path:
    """The phantom volumes (CT-RATE layout) under ``data``, generated once (a ``done`` marker), its
    physics labels (and large-nodule sizes) at HR/LR factor ``lr_factor``."""
    from hilt_scale.training.data import cache_entry
    from shards.phantom import generate_phantom

    raw = cache_entry(data, n, size, seed, lr_factor)
    if valid_fraction != 0.2:
        raw = raw.with_name(f"{raw.name}-valid{valid_fraction:g}")
    if not (raw / "done").exists():
        log(f"phantom: {n} volumes at {size}, seed {seed}, lr factor {lr_factor} -> {raw}")
        workers = min(2, os.cpu_count() or 1)
        generate_phantom(raw, n, size, seed, valid_fraction, workers=workers, lr_factor=lr_factor)
        write_text_atomic(raw / "done", "")
    return raw


def _with_dtype(path: Path, dtype: str) -> Path:
    """A shard set's directory name: uint8 sets keep ``path``, others get ``-{dtype}``."""
    return path if dtype == "uint8" else path.with_name(f"{path.name}-{dtype}")


def _shards(raw: Path, path: Path, size: tuple[int, int, int], log, dtype: str = "uint8") -> str:
    from hilt_scale.training.data import SAMPLES_PER_SHARD
    from shards.write import write_shards

    path = _with_dtype(path, dtype)
    if not (path / "index.json").exists():
        log(f"shards at {size} ({dtype}) -> {path}")
        write_shards(
            raw, path, hr_size=size, dtype=dtype, samples_per_shard=SAMPLES_PER_SHARD, progress=False
        )
    return str(path)


def build_phantom_shards(
    out: Path,
    n: int,
    size: tuple[int, int, int],
    seed: int,
    valid_fraction: float = 0.2,
    log=print,
    lr_factor: int = 2,
    dtype: str = "uint8",
) -> str:
    """One phantom of ``n`` volumes at HR ``size`` (D, H, W) and its shard set under ``out/data``
    (named by n, size, seed, LR factor, validation fraction and dtype); a finished part is reused."""
    raw = _phantom_raw(out / "data", n, size, seed, valid_fraction, log, lr_factor)
    return _shards(raw, raw.with_name(f"shards-{raw.name}"), size, log, dtype)


def prepare_phantom(
    out: Path, n: int, sizes: list[str], seed: int, log=print, lr_factor: int = 2, dtype: str = "uint8"
) -> tuple[dict[str, str], str]:
    """One phantom (CT-RATE layout) for the whole sweep at the largest HR size, its physics labels
    at ``lr_factor``, shards (``dtype``) per HR size, one tokenizer: {hr size: shard set},
    tokenizer dir. Built once; a finished part is reused."""
    from hilt_scale.training.data import split_reports, train_tokenizer_dir
    from shards.schema import parse_size

    data = out / "data"
    parsed = {s: parse_size(s) for s in sizes}
    native = tuple(max(p[i] for p in parsed.values()) for i in range(3))
    raw = _phantom_raw(data, n, native, seed, 0.2, log, lr_factor)
    shard_sets = {
        text: _shards(raw, data / f"shards-{'x'.join(map(str, size))}", size, log, dtype)
        for text, size in parsed.items()
    }
    tokenizer = data / "tokenizer"
    if not tokenizer.exists():
        train_tokenizer_dir(split_reports(next(iter(shard_sets.values())), "train"), tokenizer)
    return shard_sets, str(tokenizer)


def _hr_size_of(spec: RunSpec) -> str:
    """The run's HR size (its --set, else its resolution preset's)."""
    for item in spec.sets:
        if item.startswith("resolution.hr_size="):
            return item.split("=", 1)[1]
    from hilt_scale.model.config import preset

    return "x".join(map(str, preset("resolution", spec.resolution).hr_size))


def sweep_lr_factor(specs: list[RunSpec], native: tuple[int, int, int], log=print) -> int:
    """The HR/LR factor of the sweep's phantom labels: the runs' LR size against the phantom's grid
    (``native``) when all runs share one; else 2, said in the log (one phantom cannot label several)."""
    from hilt_scale.model.config import lr_factor, model_config

    factors = set()
    for s in specs:
        res = model_config(
            resolution=s.resolution, overrides=[x for x in s.sets if x.startswith("resolution.")]
        )
        try:
            factors.add(lr_factor(res.resolution, native))
        except ValueError:
            factors.add(None)
    if len(factors) == 1 and None not in factors:
        return factors.pop()
    log(f"phantom: runs use LR factors {sorted(map(str, factors))}; physics labels at factor 2")
    return 2


def sweep_shard_dtype(specs: list[RunSpec]) -> str:
    """The dtype of the sweep's phantom shards: int16 (HU) when any run's encoder reads HU above
    the paper's window (``model.config.shard_dtype``), for every run, so all runs see the same data."""
    from hilt_scale.model.config import model_config, shard_dtype
    from hilt_scale.recipes import recipe

    for s in specs:
        rec = recipe(s.recipe)
        sets = [x for x in [*rec.set, *s.sets] if x.startswith("vision.")]
        vision = model_config(vision=s.flags.get("vision") or rec.vision, overrides=sets).vision
        if shard_dtype(vision) == "int16":
            return "int16"
    return "uint8"


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def finished(run_dir: Path) -> bool:
    """A run that ended: its summary.json exists and is not the note of a stopped run (SIGTERM /
    SIGINT / SIGUSR1 write ``stopped`` with the checkpoint to resume from)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return False
    try:
        return "stopped" not in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _row(spec: RunSpec) -> dict:
    """The fields of a run's status row that come from its spec."""
    return {"run": spec.name, "group": spec.group, "axes": spec.axes, "seed": spec.seed}


def set_run_threads(env: dict[str, str], parallel: int, cores: int) -> str | None:
    """Give each of ``parallel`` runs cores // parallel threads in ``env`` unless OMP_NUM_THREADS is
    set; return a warning when a set value oversubscribes the cores (an exported
    OMP_NUM_THREADS=2 with --parallel 2 on 2 cores made every step ~10x slower: 13 s, not 1.3 s)."""
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, cores // parallel))
        return None
    try:
        threads = int(env["OMP_NUM_THREADS"])
    except ValueError:
        return None
    if threads * parallel <= cores:
        return None
    return (
        f"[sweep] warning: OMP_NUM_THREADS={threads} (set in the environment) x --parallel {parallel} = "
        f"{threads * parallel} threads on {cores} cores: oversubscribed runs can be many times slower; "
        f"unset it (each run then gets {max(1, cores // parallel)}) or lower --parallel"
    )


def run_sweep(
    specs: list[RunSpec],
    out: Path,
    timeout: float | None = None,
    log=print,
    phantom: dict | None = None,
    parallel: int = 1,
) -> list[dict]:
    """Run every spec that has not finished yet (``finished``; a stopped run resumes from its
    checkpoint), ``parallel`` at a time; return the status rows in the order of ``specs``.

    With ``parallel`` > 1 each run gets ``OMP_NUM_THREADS`` = cores // parallel (unless set): on a
    small CPU two one-thread runs finish sooner than two two-thread runs one after another."""
    if parallel < 1:
        raise ValueError(f"parallel={parallel}: runs at a time must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    if phantom is not None:  # cpu scale: the sweep's own phantom, same data for every run
        from shards.schema import parse_size

        sizes = sorted({_hr_size_of(s) for s in specs})
        native = tuple(max(parse_size(z)[i] for z in sizes) for i in range(3))
        factor = sweep_lr_factor(specs, native, log)
        dtype = sweep_shard_dtype(specs)
        shard_sets, tokenizer = prepare_phantom(out, phantom["n"], sizes, phantom["seed"], log, factor, dtype)
        for s in specs:
            s.flags["data"] = shard_sets[_hr_size_of(s)]
            s.sets = [*s.sets, f"llm.tokenizer_path={tokenizer}"]
    status_path = out / "sweep.json"
    rows: dict[str, dict] = {}
    todo = []
    for spec in specs:
        row = _row(spec)
        if finished(out / "runs" / spec.name):
            rows[spec.name] = {**row, "status": "done", "resumed": True}
        elif spec.pending:
            rows[spec.name] = {**row, "status": "pending", "reason": spec.pending}
        else:
            todo.append(spec)
    env = dict(os.environ)
    if parallel > 1:
        warning = set_run_threads(env, parallel, os.cpu_count() or 1)
        if warning:
            log(warning)
    t0, started, done_now = time.perf_counter(), 0, 0
    running: list[tuple[RunSpec, subprocess.Popen, Any, float]] = []

    def status(left: list[str], **extra: Any) -> None:
        ordered = [rows[s.name] for s in specs if s.name in rows]
        write_json_atomic(status_path, {"runs": ordered, "left": left, **extra})

    while todo or running:
        while todo and len(running) < parallel:
            spec = todo.pop(0)
            run_dir = out / "runs" / spec.name
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = spec.command(run_dir)
            if (run_dir / "checkpoints" / "LATEST").exists():
                cmd.append("--resume")
            elapsed = time.perf_counter() - t0
            eta = f", ETA {_fmt(elapsed / done_now * (started + len(todo) + 1 - done_now))}" if done_now else ""
            started += 1
            log(f"[sweep] run {started}/{started + len(todo)} to do ({len(specs)} in the sweep): {spec.name}  elapsed {_fmt(elapsed)}{eta}")
            write_text_atomic(run_dir / "command.txt", " ".join(cmd) + "\n")
            fh = open(run_dir / "train.log", "w", encoding="utf-8")  # noqa: SIM115 (closed when the run ends)
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
            running.append((spec, proc, fh, time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            spec, proc, fh, start = item
            wall = round(time.perf_counter() - start, 1)
            rc: int | str | None = proc.poll()
            if rc is None and timeout is not None and wall > timeout:
                proc.kill()
                proc.wait()
                rc = "timeout"
            if rc is None:
                continue
            fh.close()
            running.remove(item)
            done_now += 1
            run_dir, row = out / "runs" / spec.name, _row(spec)
            if rc == 0 and finished(run_dir):
                rows[spec.name] = {**row, "status": "done", "wall_s": wall}
                log(f"[sweep]   {spec.name} done in {_fmt(wall)}")
            else:
                log_text = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace")
                tail = log_text.strip().splitlines()[-3:]
                rows[spec.name] = {**row, "status": "failed", "rc": rc, "wall_s": wall, "log_tail": tail}
                log(f"[sweep]   {spec.name} FAILED (rc {rc}) after {_fmt(wall)}; see {run_dir / 'train.log'}")
            status([s.name for s, *_ in running] + [s.name for s in todo])
    status([], wall_s=round(time.perf_counter() - t0, 1))
    ordered = [rows[s.name] for s in specs]
    log(
        f"[sweep] {sum(r['status'] == 'done' for r in ordered)} done, {sum(r['status'] == 'failed' for r in ordered)} failed, "
        f"{sum(r['status'] == 'pending' for r in ordered)} pending; this invocation {_fmt(time.perf_counter() - t0)}"
    )
    return ordered


def present(specs: list[RunSpec], out: Path, phantom: dict | None) -> list[dict]:
    """Status rows from what is on disk, running nothing (``--collect`` while a sweep runs)."""
    if phantom is not None:  # the shard sets run_sweep made (prepare_phantom's names)
        dtype = sweep_shard_dtype(specs)
        for s in specs:
            path = _with_dtype(out / "data" / f"shards-{_hr_size_of(s)}", dtype)
            if (path / "index.json").exists():
                s.flags["data"] = str(path)
    rows = []
    for s in specs:
        done = finished(out / "runs" / s.name)
        status = "done" if done else ("pending" if s.pending else "not run")
        rows.append({"run": s.name, "group": s.group, "axes": s.axes, "seed": s.seed, "status": status})
    return rows


def collect(rows: list[dict], out: Path, phantom: bool) -> list[dict]:
    """Add each done run's table fields (scoring.run_row: the compare logic) and scores."""
    from hilt_scale.evaluation.scoring import run_row

    for row in rows:
        if row["status"] != "done":
            continue
        run_dir = out / "runs" / row["run"]
        info = run_row(run_dir)
        scores = next(iter(info["eval"].values())) or {}
        row.update(
            method=info["method"],
            hr_size=info["hr_size"],
            visual_tokens=info["visual_tokens"],
            llm=info["llm"],
        )
        row["scores"] = {k: scores.get(k) for k in ("average", "ce_micro_f1", "ce_macro_f1")}
        if phantom and (run_dir / "predictions.jsonl").exists():
            g = group_f1(read_jsonl(run_dir / "predictions.jsonl"))
            row["scores"].update(
                f1_hr_only=g["f1_hr_only"],
                f1_small_nodule=g["f1_per_kind"]["small nodule"],  # half of the HR-only group's gain
                f1_lr_visible=g["f1_lr_visible"],
            )
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per group (grid point): seeds as mean ± std, failed / pending seeds counted."""
    groups: dict[str, dict] = {}
    for r in rows:
        g = groups.setdefault(r["group"], {"group": r["group"], "axes": r["axes"], "runs": []})
        g["runs"].append(r)
    out = []
    for g in groups.values():
        done = [r for r in g["runs"] if r["status"] == "done"]
        first = done[0] if done else {}
        metrics = sorted({k for r in done for k in r.get("scores", {})})
        out.append(
            {
                **{k: first.get(k) for k in ("method", "hr_size", "visual_tokens", "llm")},
                "group": g["group"],
                "axes": g["axes"],
                "seeds_done": len(done),
                "failed": [
                    f"seed {r['seed']} (rc {r.get('rc')})" for r in g["runs"] if r["status"] == "failed"
                ],
                "pending": next((r["reason"] for r in g["runs"] if r["status"] == "pending"), None),
                "metrics": {m: mean_std([r["scores"].get(m) for r in done]) for m in metrics},
            }
        )
    return out


def table_markdown(groups: list[dict]) -> str:
    """The collected table: axes, paper-table columns, metrics as mean ± std over seeds, status."""
    axes = list(dict.fromkeys(a for g in groups for a in g["axes"]))
    metrics = [
        m
        for m in ("average", "ce_micro_f1", "ce_macro_f1", "f1_hr_only", "f1_lr_visible")
        if any(m in g["metrics"] for g in groups)
    ]
    head = [*axes, "Method", "Input resolution", "Visual tokens", "LLM", "Seeds", *metrics, "Status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [g["axes"].get(a, "") for a in axes]
        cells += [g.get("method"), g.get("hr_size"), g.get("visual_tokens"), g.get("llm"), g["seeds_done"]]
        for m in metrics:
            d = g["metrics"].get(m)
            digits = 2 if m == "average" else 3
            cells.append(f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}" if d and d["n"] else "n/a")
        status = "ok"
        if g["failed"]:
            status = "failed: " + ", ".join(g["failed"])
        elif g["pending"]:
            status = "pending: " + g["pending"]
        elif g.get("not_run"):
            status = f"seeds {g['not_run']} not run yet"
        cells.append(status)
        lines.append("| " + " | ".join("n/a" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot_experiment(groups: list[dict], experiment: str | None, path: Path) -> None:
    """Per varied axis: the average of the nine metrics and finding F1 against the axis, ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [
        a
        for a in dict.fromkeys(a for g in groups for a in g["axes"])
        if len({g["axes"].get(a) for g in groups}) > 1
    ] or list(groups[0]["axes"])[:1]
    fig, grid = plt.subplots(len(axes), 2, figsize=(9, 3.4 * len(axes)), squeeze=False)
    for row, axis in enumerate(axes):
        points = [g for g in groups if axis in g["axes"]]
        labels = [g["axes"][axis] for g in points]
        x = list(range(len(points)))
        for col, names in enumerate((("average",), ("ce_micro_f1", "ce_macro_f1", "f1_hr_only"))):
            ax = grid[row][col]
            for name in names:
                ys = [g["metrics"].get(name, {}) for g in points]
                if not any(y.get("n") for y in ys):
                    continue
                ax.errorbar(
                    x,
                    [y.get("mean", float("nan")) for y in ys],
                    yerr=[y.get("std", 0) for y in ys],
                    marker="o",
                    capsize=4,
                    label=name,
                )
            ax.set_xticks(x, labels, rotation=15, fontsize=8)
            ax.set_xlabel(axis)
            ax.set_ylabel("average of 9 metrics (0-100)" if col == 0 else "finding F1 (0-1)")
            if col == 1:
                ax.legend(fontsize=7)
    fig.suptitle(EXPERIMENT_TITLES.get(experiment or "", "sweep") + " (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: list[dict], out: Path, experiment: str | None, title: str) -> dict[str, Any]:
    """results table (Markdown + JSON) and figure of a finished (or partly failed) sweep."""
    groups = aggregate(rows)
    table = table_markdown(groups)
    write_text_atomic(out / "table.md", f"# {title}\n\n{table}\n")
    write_json_atomic(out / "table.json", {"groups": groups, "runs": rows})
    png = out / f"{experiment or 'sweep'}.png"
    if any(g["seeds_done"] for g in groups):
        plot_experiment(groups, experiment, png)
    return {"table": table, "groups": groups, "png": str(png) if png.exists() else None}


def constant_report_groups(shards: str) -> dict:
    """Group F1 and CE of the constant-report baseline on a shard set's validation reports."""
    from hilt_scale.evaluation.scoring import evaluate_records
    from hilt_scale.training.data import constant_report, split_reports

    report = constant_report(split_reports(shards, "train"))
    records = [
        {"key": str(i), "reference": r, "generated": report}
        for i, r in enumerate(split_reports(shards, "valid"))
    ]
    scores = evaluate_records(records)
    return {
        **group_f1(records),
        **{k: scores[k] for k in ("average", "ce_micro_f1", "ce_macro_f1")},
        "report": report,
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
