"""Preprocess a source once into zstd-compressed WebDataset tars plus index.json.

Each sample is three tar members sharing a key: `<key>.vol.zst` (one zstd frame of the
preprocessed C-order (D, H, W) array), `<key>.json` (metadata) and `<key>.txt` (the report).
Shards are planned up front (samples sorted by split and key, cut into fixed-count shards), so
the plan is deterministic; a rerun reuses a finished shard only when its planned keys, their
inputs (file path, size, mtime, report, labels) and the parameters are the same, rewrites the
others and removes shards of an earlier plan. Each shard is written to a temp file and renamed;
index.json is removed while shards change and written last, atomically.

Defaults follow the paper (HILT §4.1, A.4): CT-RATE's train/ and valid/ pooled, one
reconstruction per scan, a seeded 70/10/20 train/valid/test split by patient, and every volume
resampled to a 384 mm field of view (hr-size 256,512,512 -> 1.5 x 0.75 x 0.75 mm), centre
cropped or padded with air.

Usage: python -m shards.write --ct-rate DIR | --manifest CSV | --nifti-dir DIR --out OUTDIR
       [--hr-size D,H,W] [--dtype uint8|int16] [--workers N] [--on-error raise|skip]
       [--official-split] [--split-seed S] [--fov-mm 384 | --spacing z,y,x | --stretch]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import tarfile
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import numpy as np
import zstandard
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shards.ingest import (
    FOV_MM,
    MIN_COVERAGE,
    ORIENTATION,
    RESCALES,
    SPLIT_PROTOCOLS,
    DataError,
    Record,
    Summary,
    array_sha256,
    as_data_error,
    check_name,
    check_policy,
    coverage,
    fov_spacing,
    handle,
    load_canonical,
    preprocess,
    source_records,
)
from shards.io import atomic_write, lock_dir, write_json_atomic
from shards.schema import parse_size, stored_hu_range

INDEX_VERSION = 2  # 2: zstd frames carry a content checksum; shards list crc32 of json and txt
PARTS_DIR = ".parts"  # per-shard info of finished shards, so a rerun can skip them
MEMBERS = ("json", "txt", "vol.zst")
PAPER = {"split": "patient", "fov_mm": FOV_MM}  # HILT §4.1 / A.4: write_shards(..., **PAPER)
SHARD_NAME = re.compile(r"[A-Za-z0-9_-]+-\d{6}\.tar")


def encode_sample(
    rec: Record, hr_size, dtype: str, target_spacing, zstd_level: int, rescale: str = "auto"
) -> tuple[dict, bytes, bytes]:
    """Load, preprocess and compress one record: (json metadata, zstd bytes, report bytes)."""
    hu, spacing = load_canonical(rec, rescale)
    arr, out_spacing = preprocess(hu, spacing, hr_size, dtype, target_spacing)
    meta = {
        "coverage": round(coverage(hu.shape, spacing, hr_size, target_spacing), 4),
        "key": rec.key,
        "shape": list(arr.shape),
        "dtype": dtype,
        "spacing": [round(s, 6) for s in out_spacing],
        "source_spacing": [round(s, 6) for s in spacing],
        "source_shape": list(hu.shape),
        "orientation": list(ORIENTATION),
        "hu_window": list(stored_hu_range(dtype)),
        "source": str(rec.path),
        "sha256": array_sha256(arr),
        "dataset": rec.dataset,
        "split": rec.split,
        "labels": rec.labels,
        **rec.extra,
    }
    # The frame's content checksum (xxhash64) lets every read detect a damaged volume cheaply.
    vol = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True).compress(arr.tobytes())
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
    """Write one shard from its records (in a worker, or in the caller's process with one worker):
    temp file, then rename; return its info. Its resampling runs on one thread; the caller's thread
    count is restored after (the trainer builds its phantom in-process, then trains)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _write_one_shard(job)
    finally:
        torch.set_num_threads(threads)


def _write_one_shard(job: dict) -> dict:
    out = Path(job["out"])
    name = job["name"]
    summary = Summary(found=len(job["records"]))
    final = out / name
    crcs: list[list[int]] = []
    with (
        atomic_write(final, "wb") as fh,
        tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tf,
    ):
        for r in job["records"]:
            rec = Record(**{**r, "path": Path(r["path"])})
            try:
                meta, vol, txt = encode_sample(
                    rec,
                    job["hr_size"],
                    job["dtype"],
                    job["target_spacing"],
                    job["zstd_level"],
                    job["rescale"],
                )
            except Exception as e:  # the per-sample boundary: any failure is this sample's, counted
                handle(as_data_error(e, rec.path, rec.key), job["on_error"], summary)
                continue
            if meta["coverage"] < MIN_COVERAGE:
                summary.flag(
                    "low_coverage",
                    f"low_coverage: {rec.path} [key {rec.key}]: fills {meta['coverage']:.1%} of the grid",
                )
            js = json.dumps(meta, sort_keys=True).encode()
            _add(tf, f"{rec.key}.json", js)
            _add(tf, f"{rec.key}.txt", txt)
            _add(tf, f"{rec.key}.vol.zst", vol)
            crcs.append([zlib.crc32(js), zlib.crc32(txt)])
            summary.kept += 1
            summary.rescale[meta["rescale"]] += 1
    keys, members = shard_members(final)
    info = {
        "name": name,
        "split": job["split"],
        "count": len(keys),
        "bytes": final.stat().st_size,
        "sha256": file_sha256(final),
        "keys": keys,
        "members": members,
        "crc32": crcs,
        "summary": summary.as_dict(),
        "plan": job["plan"],
    }
    write_json_atomic(out / PARTS_DIR / f"{name}.json", info)
    return info


def plan_hash(recs: list[Record], params: dict) -> str:
    """Fingerprint of one planned shard: its records (key, report, labels, ...), each input file's
    path, size and mtime, and the parameters. A finished shard is reused only when this matches."""
    items = []
    for r in recs:
        try:
            st = os.stat(r.path)
            stat = [st.st_size, st.st_mtime_ns]
        except OSError:
            stat = None
        items.append({**asdict(r), "path": str(r.path), "stat": stat})
    text = json.dumps({"params": params, "records": items}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _finished(out: Path, name: str, plan: str) -> dict | None:
    """Info of a shard finished by an earlier run of the same plan (keys, inputs, params), else None."""
    part = out / PARTS_DIR / f"{name}.json"
    if not (out / name).exists() or not part.exists():
        return None
    try:
        info = json.loads(part.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("plan") != plan or info.get("bytes") != (out / name).stat().st_size:
        return None
    return info


def _owned(out: Path) -> set[str]:
    """Shard names this writer can prove it wrote into ``out``: a ``.parts`` entry or the old index."""
    names = {p.name[: -len(".json")] for p in (out / PARTS_DIR).glob("*.json")}
    try:
        names |= {s["name"] for s in json.loads((out / "index.json").read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return names


def _one_writer(fn):
    """Run ``fn(source, out_dir, ...)`` holding the lock of ``out_dir`` (``shards.io.lock_dir``):
    a second writer into the same directory is refused at once, naming the first."""

    @functools.wraps(fn)
    def locked(source, out_dir, *args, **kwargs):
        fd = lock_dir(out_dir, "shards.write")
        try:
            return fn(source, out_dir, *args, **kwargs)
        finally:
            os.close(fd)

    return locked


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued shards and terminate the running workers (their temp files are removed
    by atomic_write on the next run's plan; no shard or index is half written)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # gone after shutdown
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(timeout=10)


def _remove_stale(out: Path, planned: set[str]) -> list[str]:
    """Remove shards (and their .parts info) that an earlier run wrote and this plan no longer has."""
    removed = []
    for part in sorted((out / PARTS_DIR).glob("*.json")):
        name = part.name[: -len(".json")]
        if name in planned or not SHARD_NAME.fullmatch(name):
            continue
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
        part.unlink()
        removed.append(name)
    return removed


def _inside(out: Path, name: str) -> Path:
    """out/name, refusing any name that would land outside out (names are checked before; belt and braces)."""
    path = (out / name).resolve()
    if path.parent != out.resolve() or not SHARD_NAME.fullmatch(name):
        raise ValueError(f"shard name {name!r} would be written outside {out}")
    return path


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


def _check_records(records: list[Record], summary: Summary, on_error: str) -> list[Record]:
    """Records given directly (Python API): their split and key must be safe names, keys unique."""
    out, seen = [], set()
    for r in records:
        try:
            check_name(r.split, "split", r.path, r.key)
            check_name(r.key, "key", r.path, r.key)
            if r.key in seen:
                raise DataError("duplicate_key", r.path, r.key, "another sample already has this key")
        except DataError as e:
            handle(e, on_error, summary)
            continue
        seen.add(r.key)
        out.append(r)
    summary.kept = len(out)
    return out


@_one_writer
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
    split: str = "official",
    split_seed: int = 0,
    fov_mm: float | None = None,
    rescale: str = "auto",
) -> dict:
    """Write a shard set from a source (CT-RATE tree, manifest CSV, NIfTI dir or records); return the index.

    Resampling: ``target_spacing`` (z, y, x mm) if given, else ``fov_mm / hr_size`` per axis
    (``fov_mm=384``: the paper's fixed field of view), then centre crop/pad with air; with neither,
    each volume is resized straight to ``hr_size`` (stretch). ``split``: "patient" (paper: pooled,
    70/10/20 by patient, seeded by ``split_seed``) or "official". The command line defaults to the
    paper (``**PAPER``); these Python defaults keep the earlier behaviour for existing callers
    (the trainer's cached phantom default and ``hilt_scale.generate``'s NIfTI path assume it).
    ``rescale``: where stored values become HU (``ingest.read_hu``): auto | csv | header; the
    choices made are counted in the index's summary. Raises DataError("no_samples") when no
    sample is left to write.
    """
    check_policy(on_error)
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    if dtype not in ("uint8", "int16"):
        raise ValueError(f"dtype must be uint8 or int16, got {dtype!r}")
    if split not in SPLIT_PROTOCOLS:
        raise ValueError(f"split must be one of {SPLIT_PROTOCOLS}, got {split!r}")
    hr_size = tuple(int(v) for v in hr_size)
    resample = "spacing" if target_spacing is not None else "fov" if fov_mm is not None else "stretch"
    if target_spacing is not None:
        target_spacing = tuple(float(v) for v in target_spacing)
        if len(target_spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in target_spacing):
            raise ValueError(f"target spacing must be three positive z,y,x mm, got {target_spacing}")
    elif fov_mm is not None:
        target_spacing = fov_spacing(hr_size, fov_mm)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(source, list):
        summary = Summary(found=len(source))
        records = _check_records(source, summary, on_error)
    else:
        records, summary = source_records(source, on_error, report_field, split, split_seed)
    if not records:
        raise DataError(
            "no_samples",
            source if not isinstance(source, list) else "<records>",
            "-",
            f"found {summary.found}, none usable; dropped {dict(summary.dropped)}; nothing written",
        )
    if samples_per_shard is None:
        # ~3x compression is typical for noisy CT at uint8; keep at least one shard per worker.
        est = max(1, math.prod(hr_size) * np.dtype(dtype).itemsize // 3)
        largest = max((sum(r.split == s for r in records) for s in {r.split for r in records}), default=1)
        samples_per_shard = max(1, min(shard_bytes // est, math.ceil(largest / max(1, workers))))
    params = {
        "hr_size": list(hr_size),
        "dtype": dtype,
        "target_spacing": list(target_spacing) if target_spacing else None,
        "zstd_level": zstd_level,
        "format": INDEX_VERSION,
        "rescale": rescale,
    }
    if dtype == "int16":  # int16 shards written before round 7 held the paper's window: rewrite them
        params["hu_range"] = list(stored_hu_range(dtype))
    plan = plan_shards(records, samples_per_shard)
    jobs, infos = [], {}
    owned = _owned(out)
    for name, split_name, recs in plan:
        _inside(out, name)
        if (out / name).exists() and name not in owned:
            raise DataError(
                "not_ours", out / name, "-",
                "exists but this writer did not write it (no .parts entry, not in index.json): "
                "it is never overwritten; move it away or pick another --out",
            )  # fmt: skip
        fingerprint = plan_hash(recs, params)
        done = _finished(out, name, fingerprint)
        if done is not None:
            infos[name] = done
            continue
        jobs.append({
            "out": str(out), "name": name, "split": split_name, "hr_size": hr_size, "dtype": dtype,
            "target_spacing": target_spacing, "zstd_level": zstd_level, "on_error": on_error, "rescale": rescale,
            "plan": fingerprint, "records": [{**asdict(r), "path": str(r.path)} for r in recs],
        })  # fmt: skip
    planned = {name for name, _, _ in plan}
    stale = [p for p in (out / PARTS_DIR).glob("*.json") if p.name[: -len(".json")] not in planned]
    if jobs or stale:  # shards are about to change: an old index must not describe them meanwhile
        with contextlib.suppress(FileNotFoundError):
            (out / "index.json").unlink()
    total = sum(len(j["records"]) for j in jobs)
    columns = (TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("write", total=total)
        if workers > 1 and len(jobs) > 1:
            ctx = multiprocessing.get_context("spawn")  # torch in forked children can deadlock
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                futures = {pool.submit(write_one_shard, j): j for j in jobs}
                try:
                    for fut in as_completed(futures):
                        info = fut.result()
                        infos[info["name"]] = info
                        bar.advance(task, len(futures[fut]["records"]))
                except BaseException:  # an error, Ctrl-C or SIGTERM: stop the workers, never orphan them
                    _stop_workers(pool)
                    raise
        else:
            for j in jobs:
                info = write_one_shard(j)
                infos[info["name"]] = info
                bar.advance(task, len(j["records"]))
    removed = _remove_stale(out, planned)
    shards = [infos[name] for name, _, _ in plan]
    dropped, flagged, rescaled = Counter(summary.dropped), Counter(summary.flagged), Counter()
    errors = list(summary.errors)
    for s in shards:
        dropped.update(s["summary"]["dropped"])
        flagged.update(s["summary"].get("flagged", {}))
        rescaled.update(s["summary"].get("rescale", {}))
        errors.extend(s["summary"]["errors"])
    splits: dict[str, int] = {}
    for s in shards:
        splits[s["split"]] = splits.get(s["split"], 0) + s["count"]
    written = sum(splits.values())
    if not written:  # every volume failed: no index may describe empty shards as a shard set
        raise DataError(
            "no_samples",
            source if not isinstance(source, list) else "<records>",
            "-",
            f"found {summary.found}, none written; dropped {dict(sorted(dropped.items()))}; errors: {errors[:3]}",
        )
    index = {
        "version": INDEX_VERSION,
        "shards": [
            {k: s[k] for k in ("name", "split", "count", "bytes", "sha256", "keys", "members", "crc32")}
            for s in shards
        ],
        "splits": splits,
        "hr_size": list(hr_size),
        "dtype": dtype,
        "orientation": list(ORIENTATION),
        "preprocessing": {
            "target_spacing": params["target_spacing"],
            "resample": resample,  # fov | spacing (then centre crop/pad with -1000 HU) | stretch
            "fov_mm": fov_mm if resample == "fov" else None,
            "split": split,
            "split_seed": split_seed,
            "rescale": rescale,  # the policy; summary.rescale counts what each volume got
        },
        "summary": {
            "found": summary.found,
            "written": written,
            "dropped": dict(sorted(dropped.items())),
            "flagged": dict(sorted(flagged.items())),
            "rescale": dict(sorted(rescaled.items())),  # volumes made HU by the CSV rescale | the header
            "unaccounted": summary.found - written - sum(dropped.values()),
            "stale_shards_removed": removed,
            "errors": errors[:50],
        },
    }
    write_json_atomic(out / "index.json", index)
    return index


def main(argv: list[str] | None = None) -> None:
    """CLI: write the shard set and print its summary as JSON; exit 1 with a message on bad input."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ct-rate", help="CT-RATE tree (reports, metadata and label CSVs + <split>/ NIfTI)")
    src.add_argument("--manifest", help="CSV with columns path,report[,split][,id][,patient]")
    src.add_argument("--nifti-dir", help="directory of NIfTI files with <name>.txt reports beside them")
    p.add_argument("--out", required=True)
    p.add_argument("--hr-size", type=parse_size, default=(256, 512, 512), help="D,H,W (default 256,512,512)")
    p.add_argument("--dtype", choices=("uint8", "int16"), default="uint8")
    geometry = p.add_mutually_exclusive_group()
    geometry.add_argument(
        "--fov-mm",
        type=float,
        default=FOV_MM,
        help="field of view of the grid on every axis (default 384, paper A.4)",
    )
    geometry.add_argument(
        "--spacing",
        type=lambda s: tuple(float(v) for v in s.split(",")),
        help="target z,y,x mm, then crop/pad",
    )
    geometry.add_argument("--stretch", action="store_true", help="resize each volume straight to --hr-size")
    p.add_argument(
        "--official-split", action="store_true", help="keep CT-RATE's train/valid folders (no test split)"
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient split (default 0)")
    p.add_argument(
        "--rescale",
        choices=RESCALES,
        default="auto",
        help="where stored values become HU: auto (per volume: CT-RATE v1 raw -> CSV rescale, v2 HU -> "
        "header), csv, header (default auto)",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    p.add_argument("--samples-per-shard", type=int, help="default: about --shard-mb per shard")
    p.add_argument("--shard-mb", type=int, default=1024, help="target shard size in MB (estimated)")
    p.add_argument("--report-field", choices=("findings", "impressions", "both"), default="findings")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: workers stopped, lock released
    source = a.ct_rate or a.manifest or a.nifti_dir
    try:
        index = write_shards(
            source, a.out, a.hr_size, a.dtype, a.workers, a.on_error, a.spacing, a.samples_per_shard,
            shard_bytes=a.shard_mb << 20, report_field=a.report_field, progress=not a.no_progress,
            split="official" if a.official_split else "patient", split_seed=a.split_seed,
            fov_mm=None if a.stretch else a.fov_mm, rescale=a.rescale,
        )  # fmt: skip
    except DataError as e:
        print(f"shards.write: {e}", file=sys.stderr)
        sys.exit(1)
    except (OSError, RuntimeError) as e:  # a full disk, a read-only --out, another writer's lock
        print(f"shards.write: writing into {a.out} failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    s = index["summary"]
    print(
        f"found {s['found']}, written {s['written']}, dropped {sum(s['dropped'].values())} {s['dropped']}, "
        f"flagged {s['flagged']}; rescale {s['rescale']}; splits {index['splits']}",
        file=sys.stderr,
    )
    print(json.dumps({"out": a.out, "shards": len(index["shards"]), "splits": index["splits"], "summary": s}))


if __name__ == "__main__":
    main()
