"""Preprocess a source once into zstd-compressed WebDataset tars plus index.json.

Each sample is three tar members sharing a key: `<key>.vol.zst` (one zstd frame of the
preprocessed C-order (D, H, W) array), `<key>.json` (metadata) and `<key>.txt` (the report).
Shards are planned up front (samples sorted by split and key, cut into fixed-count shards), so
the plan is deterministic and a rerun skips every shard already finished. Each shard is written
to a temp file and renamed; index.json is written last, atomically.

Usage: python -m shards.write --ct-rate DIR | --manifest CSV | --nifti-dir DIR --out OUTDIR
       [--hr-size D,H,W] [--dtype uint8|int16] [--workers N] [--on-error raise|skip]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import numpy as np
import zstandard
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shards.ingest import (
    ORIENTATION,
    DataError,
    Record,
    Summary,
    array_sha256,
    check_policy,
    handle,
    load_canonical,
    preprocess,
    source_records,
)
from shards.io import atomic_write, write_json_atomic
from shards.schema import HU_WINDOW, parse_size

INDEX_VERSION = 1
PARTS_DIR = ".parts"  # per-shard info of finished shards, so a rerun can skip them
MEMBERS = ("json", "txt", "vol.zst")


def encode_sample(
    rec: Record, hr_size, dtype: str, target_spacing, zstd_level: int
) -> tuple[dict, bytes, bytes]:
    """Load, preprocess and compress one record: (json metadata, zstd bytes, report bytes)."""
    hu, spacing = load_canonical(rec)
    arr, out_spacing = preprocess(hu, spacing, hr_size, dtype, target_spacing)
    meta = {
        "key": rec.key,
        "shape": list(arr.shape),
        "dtype": dtype,
        "spacing": [round(s, 6) for s in out_spacing],
        "source_spacing": [round(s, 6) for s in spacing],
        "source_shape": list(hu.shape),
        "orientation": list(ORIENTATION),
        "hu_window": list(HU_WINDOW),
        "source": str(rec.path),
        "sha256": array_sha256(arr),
        "dataset": rec.dataset,
        "split": rec.split,
        "labels": rec.labels,
        **rec.extra,
    }
    vol = zstandard.ZstdCompressor(level=zstd_level).compress(arr.tobytes())
    return meta, vol, rec.report.encode("utf-8")


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member with fixed metadata, so the same input always gives the same tar bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def shard_members(path: Path) -> tuple[list[str], list[dict[str, list[int]]]]:
    """(keys, per-key {member: [data offset, size]}) of a shard tar, in file order."""
    keys: list[str] = []
    members: list[dict[str, list[int]]] = []
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if not keys or keys[-1] != key:
                keys.append(key)
                members.append({})
            members[-1][ext] = [m.offset_data, m.size]
    return keys, members


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_one_shard(job: dict) -> dict:
    """Write one shard from its records (runs in a worker): temp file, then rename; return its info."""
    import torch

    torch.set_num_threads(1)
    out = Path(job["out"])
    name = job["name"]
    summary = Summary(found=len(job["records"]))
    final = out / name
    with (
        atomic_write(final, "wb") as fh,
        tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tf,
    ):
        for r in job["records"]:
            rec = Record(**{**r, "path": Path(r["path"])})
            try:
                meta, vol, txt = encode_sample(
                    rec, job["hr_size"], job["dtype"], job["target_spacing"], job["zstd_level"]
                )
            except DataError as e:
                handle(e, job["on_error"], summary)
                continue
            _add(tf, f"{rec.key}.json", json.dumps(meta, sort_keys=True).encode())
            _add(tf, f"{rec.key}.txt", txt)
            _add(tf, f"{rec.key}.vol.zst", vol)
            summary.kept += 1
    keys, members = shard_members(final)
    info = {
        "name": name,
        "split": job["split"],
        "count": len(keys),
        "bytes": final.stat().st_size,
        "sha256": file_sha256(final),
        "keys": keys,
        "members": members,
        "summary": summary.as_dict(),
        "params": job["params"],
    }
    write_json_atomic(out / PARTS_DIR / f"{name}.json", info)
    return info


def _finished(out: Path, name: str, params: dict) -> dict | None:
    """Info of a shard finished by an earlier run with the same parameters, else None."""
    part = out / PARTS_DIR / f"{name}.json"
    if not (out / name).exists() or not part.exists():
        return None
    info = json.loads(part.read_text())
    if info.get("params") != params or info.get("bytes") != (out / name).stat().st_size:
        return None
    return info


def plan_shards(records: list[Record], samples_per_shard: int) -> list[tuple[str, str, list[Record]]]:
    """Cut records (sorted by split, key) into (name, split, records) shards of a fixed count."""
    by_split: dict[str, list[Record]] = {}
    for r in sorted(records, key=lambda r: (r.split, r.key)):
        by_split.setdefault(r.split, []).append(r)
    plan = []
    for split, recs in by_split.items():
        for i in range(0, len(recs), samples_per_shard):
            plan.append((f"{split}-{i // samples_per_shard:06d}.tar", split, recs[i : i + samples_per_shard]))
    return plan


def write_shards(
    source: str | os.PathLike | list[Record],
    out_dir: str | os.PathLike,
    hr_size: tuple[int, int, int] = (256, 512, 512),
    dtype: str = "uint8",
    workers: int = 1,
    on_error: str = "raise",
    target_spacing: tuple[float, float, float] | None = None,
    samples_per_shard: int | None = None,
    shard_bytes: int = 1 << 30,
    report_field: str = "findings",
    zstd_level: int = 6,
    progress: bool = True,
) -> dict:
    """Write a shard set from a source (CT-RATE tree, manifest CSV, NIfTI dir or records); return the index."""
    check_policy(on_error)
    if dtype not in ("uint8", "int16"):
        raise ValueError(f"dtype must be uint8 or int16, got {dtype!r}")
    hr_size = tuple(int(v) for v in hr_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(source, list):
        records, summary = source, Summary(found=len(source), kept=len(source))
    else:
        records, summary = source_records(source, on_error, report_field)
    if samples_per_shard is None:
        # ~3x compression is typical for noisy CT at uint8; keep at least one shard per worker.
        est = max(1, math.prod(hr_size) * np.dtype(dtype).itemsize // 3)
        largest = max((sum(r.split == s for r in records) for s in {r.split for r in records}), default=1)
        samples_per_shard = max(1, min(shard_bytes // est, math.ceil(largest / max(1, workers))))
    params = {
        "hr_size": list(hr_size),
        "dtype": dtype,
        "target_spacing": target_spacing,
        "zstd_level": zstd_level,
    }
    plan = plan_shards(records, samples_per_shard)
    jobs, infos = [], {}
    for name, split, recs in plan:
        done = _finished(out, name, params)
        if done is not None:
            infos[name] = done
            continue
        jobs.append({
            "out": str(out), "name": name, "split": split, "hr_size": hr_size, "dtype": dtype,
            "target_spacing": target_spacing, "zstd_level": zstd_level, "on_error": on_error, "params": params,
            "records": [{**asdict(r), "path": str(r.path)} for r in recs],
        })  # fmt: skip
    total = sum(len(j["records"]) for j in jobs)
    columns = (TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("write", total=total)
        if workers > 1 and len(jobs) > 1:
            ctx = multiprocessing.get_context("spawn")  # torch in forked children can deadlock
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                futures = {pool.submit(write_one_shard, j): j for j in jobs}
                for fut in as_completed(futures):
                    info = fut.result()
                    infos[info["name"]] = info
                    bar.advance(task, len(futures[fut]["records"]))
        else:
            for j in jobs:
                info = write_one_shard(j)
                infos[info["name"]] = info
                bar.advance(task, len(j["records"]))
    shards = [infos[name] for name, _, _ in plan]
    dropped = Counter(summary.dropped)
    errors = list(summary.errors)
    for s in shards:
        dropped.update(s["summary"]["dropped"])
        errors.extend(s["summary"]["errors"])
    splits: dict[str, int] = {}
    for s in shards:
        splits[s["split"]] = splits.get(s["split"], 0) + s["count"]
    index = {
        "version": INDEX_VERSION,
        "shards": [
            {k: s[k] for k in ("name", "split", "count", "bytes", "sha256", "keys", "members")}
            for s in shards
        ],
        "splits": splits,
        "hr_size": list(hr_size),
        "dtype": dtype,
        "orientation": list(ORIENTATION),
        "summary": {
            "found": summary.found,
            "written": sum(splits.values()),
            "dropped": dict(sorted(dropped.items())),
            "errors": errors[:50],
        },
    }
    write_json_atomic(out / "index.json", index)
    return index


def main(argv: list[str] | None = None) -> None:
    """CLI: write the shard set and print its summary as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ct-rate", help="CT-RATE tree (reports, metadata and label CSVs + <split>/ NIfTI)")
    src.add_argument("--manifest", help="CSV with columns path,report[,split][,id]")
    src.add_argument("--nifti-dir", help="directory of NIfTI files with <name>.txt reports beside them")
    p.add_argument("--out", required=True)
    p.add_argument("--hr-size", type=parse_size, default=(256, 512, 512), help="D,H,W (default 256,512,512)")
    p.add_argument("--dtype", choices=("uint8", "int16"), default="uint8")
    p.add_argument(
        "--spacing",
        type=lambda s: tuple(float(v) for v in s.split(",")),
        help="target z,y,x mm, then crop/pad",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    p.add_argument("--samples-per-shard", type=int, help="default: about --shard-mb per shard")
    p.add_argument("--shard-mb", type=int, default=1024, help="target shard size in MB (estimated)")
    p.add_argument("--report-field", choices=("findings", "impressions", "both"), default="findings")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    source = a.ct_rate or a.manifest or a.nifti_dir
    index = write_shards(
        source, a.out, a.hr_size, a.dtype, a.workers, a.on_error, a.spacing, a.samples_per_shard,
        shard_bytes=a.shard_mb << 20, report_field=a.report_field, progress=not a.no_progress,
    )  # fmt: skip
    print(
        json.dumps(
            {
                "out": a.out,
                "shards": len(index["shards"]),
                "splits": index["splits"],
                "summary": index["summary"],
            }
        )
    )


if __name__ == "__main__":
    main()
