"""Check every shard of a shard set against its index: presence, size, sha256, members, samples.

Usage: python -m shards.verify OUTDIR [--no-decode]   (exit status 1 when anything is wrong)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shards.ingest import DataError
from shards.read import ShardSet
from shards.write import file_sha256, shard_members


def verify_shards(path: str | Path, decode: bool = True) -> dict:
    """Return {"ok", "shards", "samples", "decoded", "problems": [...], "warnings": [...]} for a shard set.

    Problems: a shard missing, of the wrong size or sha256, or whose members differ from the index;
    a sample that does not decode or whose checksums differ; a key in two shards; split counts or
    the summary (found = written + dropped) that do not add up. Warnings: tars the index does not list.
    """
    problems: list[str] = []
    warnings: list[str] = []
    try:
        shard_set = ShardSet(path)
    except DataError as e:
        return {"ok": False, "shards": 0, "samples": 0, "problems": [str(e)]}
    n = 0
    for i, s in enumerate(shard_set.shards):
        f = shard_set.root / s["name"]
        if not f.exists():
            problems.append(f"{f}: missing")
            continue
        if f.stat().st_size != s["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, index says {s['bytes']}")
        if file_sha256(f) != s["sha256"]:
            problems.append(f"{f}: sha256 differs from the index")
            continue
        try:
            keys, members = shard_members(f)
        except Exception as e:  # tarfile raises several types on damaged archives
            problems.append(f"{f}: unreadable tar ({type(e).__name__}: {e})")
            continue
        if len(keys) != s["count"] or keys != s["keys"] or members != s["members"]:
            problems.append(
                f"{f}: {len(keys)} samples / member layout differ from the index (count {s['count']})"
            )
            continue
        for j in range(s["count"]):
            if not decode:
                break
            try:
                shard_set.read(i, j, verify=True)
                n += 1
            except DataError as e:
                problems.append(str(e))
    owner: dict[str, str] = {}
    for s in shard_set.shards:
        for key in s["keys"]:
            if key in owner:
                problems.append(f"key {key}: in {owner[key]} and in {s['name']} (duplicate across shards)")
            owner.setdefault(key, s["name"])
    listed = {s["name"] for s in shard_set.shards}
    for f in sorted(shard_set.root.glob("*.tar")):
        if f.name not in listed:
            warnings.append(f"{f}: not listed in index.json (not read by any loader)")
    summary = shard_set.index.get("summary", {})
    if summary.get("unaccounted"):
        problems.append(f"summary: {summary['unaccounted']} found samples neither written nor dropped")
    total = sum(s["count"] for s in shard_set.shards)
    for split, count in shard_set.index.get("splits", {}).items():
        have = sum(s["count"] for s in shard_set.shards if s["split"] == split)
        if have != count:
            problems.append(f"split {split}: index says {count} samples, shards hold {have}")
    shard_set.close()
    return {
        "ok": not problems,
        "shards": len(shard_set.shards),
        "samples": total,
        "decoded": n,
        "problems": problems,
        "warnings": warnings,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI: print the verification report as JSON; exit 1 on any problem."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="shard set directory (with index.json)")
    p.add_argument(
        "--no-decode", action="store_true", help="check files and sha256 only, do not decode samples"
    )
    a = p.parse_args(argv)
    report = verify_shards(a.out, decode=not a.no_decode)
    print(json.dumps(report, indent=1))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
