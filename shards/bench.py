"""Benchmark: decode speed of a shard set per worker count vs loading the same volumes' .nii.gz.

Prints a table, then one JSON line with samples/s and MB/s decoded per worker count, bytes per
sample on disk, the nibabel load time of the source .nii.gz files (what users do today), and
`speedup_vs_nibabel` = decode samples/s per core / nibabel samples/s on one core.

Usage: python -m shards.bench OUTDIR [--workers 1,2] [--samples N] [--split train]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from shards.read import ShardSet, frame_has_checksum


def _decode_part(args: tuple[str, list[tuple[int, int]]]) -> int:
    """Read and decode the given samples in this process; return decoded bytes."""
    path, entries = args
    shard_set = ShardSet(path)
    total = sum(shard_set.read(i, j)["hr"].nbytes for i, j in entries)
    shard_set.close()
    return total


def _noop(_: int) -> None:
    return None


def bench_decode(path: str, entries: list[tuple[int, int]], workers: int, repeats: int = 3) -> dict:
    """Best-of-`repeats` wall time to decode all entries split over `workers` processes (pool start excluded)."""
    parts = [(path, entries[w::workers]) for w in range(workers)]
    times, nbytes = [], 0
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_noop, range(workers))
        for _ in range(repeats):
            t0 = time.perf_counter()
            nbytes = _decode_part(parts[0]) if workers == 1 else sum(pool.map(_decode_part, parts))
            times.append(time.perf_counter() - t0)
    dt, n = min(times), len(entries)
    return {
        "workers": workers,
        "seconds": dt,
        "samples_per_s": n / dt,
        "mb_per_s": nbytes / dt / 1e6,
        "samples_per_s_per_worker": n / dt / workers,
    }


def bench_nibabel(sources: list[Path], repeats: int = 3) -> dict:
    """Best-of-`repeats` wall time to load the source .nii.gz files with nibabel on one core (array as stored)."""
    times, nbytes = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        nbytes = sum(np.asarray(nib.load(str(p)).dataobj).nbytes for p in sources)
        times.append(time.perf_counter() - t0)
    dt = min(times)
    return {"seconds": dt, "samples_per_s": len(sources) / dt, "mb_per_s": nbytes / dt / 1e6}


def _warm(files: list[Path]) -> None:
    """Read files once so both sides are timed from the page cache, not from a cold disk."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def run_bench(
    path: str, workers: list[int], samples: int | None = None, split: str | None = None, repeats: int = 3
) -> dict:
    """Run the decode and nibabel benchmarks; return the JSON result."""
    shard_set = ShardSet(path)
    split = split or next(iter(shard_set.index["splits"]))
    entries = shard_set.entries(split)[:samples] if samples else shard_set.entries(split)
    metas = [shard_set.read(i, j)["meta"] for i, j in entries]
    i, j = entries[0]
    first = shard_set.shards[i]["members"][j]["vol.zst"]
    # Every read checks integrity: the zstd content checksum, or the array's sha256 for older frames.
    checksum = frame_has_checksum(shard_set._pread(i, first[0], min(first[1], 32), "-"))
    sources = [Path(m["source"]) for m in metas]
    shard_bytes = sum(s["bytes"] for s in shard_set.shards if s["split"] == split) / sum(
        s["count"] for s in shard_set.shards if s["split"] == split
    )
    _warm([shard_set.root / s["name"] for s in shard_set.shards if s["split"] == split])
    decode = [bench_decode(path, entries, w, repeats) for w in workers]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "samples": len(entries),
        "hr_size": shard_set.hr_size,
        "dtype": shard_set.dtype,
        "bytes_per_sample": round(shard_bytes),
        "integrity_check": "zstd content checksum"
        if checksum
        else "sha256 of the array (frames without checksum)",
        "repeats": repeats,
        "decode": decode,
    }
    if all(p.exists() for p in sources):
        _warm(sources)
        nb = bench_nibabel(sources, repeats)
        nii_bytes = sum(p.stat().st_size for p in sources) / len(sources)
        one = next(d for d in decode if d["workers"] == min(workers))
        result.update({
            "nibabel": nb,
            "nifti_bytes_per_sample": round(nii_bytes),
            "bytes_ratio_vs_nifti": shard_bytes / nii_bytes,
            "speedup_vs_nibabel": one["samples_per_s_per_worker"] / nb["samples_per_s"],
        })  # fmt: skip
    else:
        result["nibabel"] = None
        result["speedup_vs_nibabel"] = None
    return result


def main(argv: list[str] | None = None) -> None:
    """CLI: print the table, then the JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="shard set directory")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--samples", type=int, help="at most this many samples")
    p.add_argument("--split")
    p.add_argument("--repeats", type=int, default=3, help="best of this many timed passes")
    a = p.parse_args(argv)
    r = run_bench(a.out, [int(w) for w in a.workers.split(",")], a.samples, a.split, a.repeats)
    print(
        f"shard set {a.out}: {r['samples']} samples of {r['hr_size']} {r['dtype']}, {r['machine']}, best of {r['repeats']}"
    )
    print(f"integrity check on every read: {r['integrity_check']}")
    print(f"{'reader':<22}{'workers':>8}{'samples/s':>12}{'per worker':>12}{'MB/s':>10}")
    for d in r["decode"]:
        print(
            f"{'shards (zstd)':<22}{d['workers']:>8}{d['samples_per_s']:>12.2f}{d['samples_per_s_per_worker']:>12.2f}{d['mb_per_s']:>10.1f}"
        )
    if r["nibabel"]:
        nb = r["nibabel"]
        print(
            f"{'nibabel (.nii.gz)':<22}{1:>8}{nb['samples_per_s']:>12.2f}{nb['samples_per_s']:>12.2f}{nb['mb_per_s']:>10.1f}"
        )
        print(
            f"bytes/sample: shards {r['bytes_per_sample']:,}  nii.gz {r['nifti_bytes_per_sample']:,}  ratio {r['bytes_ratio_vs_nifti']:.3f}"
        )
        print(f"speedup_vs_nibabel (per core): {r['speedup_vs_nibabel']:.1f}x")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
