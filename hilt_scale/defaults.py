"""The embedded default dataset, built once into a cache: phantom volumes -> shards -> tokenizer.

The phantom is written in CT-RATE's layout (NIfTI + report/metadata/label CSVs), so the real
ingestion path (``shards.write``) turns it into shards exactly as it would CT-RATE. The cache
entry appears in one rename when complete; concurrent builders (two "nodes" on one machine)
each build into their own temp directory and the loser discards its copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

# Shards hold few volumes each so that ranks x loader workers always have shards to split.
SAMPLES_PER_SHARD = 8
TOKENIZER_VOCAB = 2048


def cache_entry(cache: Path, n: int, size: tuple[int, int, int], seed: int) -> Path:
    """Directory of one phantom build, named by everything that changes its content."""
    return cache / f"phantom-n{n}-{size[0]}x{size[1]}x{size[2]}-seed{seed}"


def split_reports(path: str | Path, split: str) -> list[str]:
    """The reports (``txt`` members) of one split of a shard set, read without decoding volumes."""
    path = Path(path)
    index_path = path / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{index_path} is missing: {path} is not a finished shard set") from None
    reports = []
    for shard in index["shards"]:
        if shard.get("split") != split:
            continue
        with tarfile.open(path / shard["name"]) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    reports.append(tar.extractfile(member).read().decode("utf-8"))
    if not reports:
        raise ValueError(f"{index_path}: split {split!r} has no reports (splits: {index.get('splits')})")
    return reports


def train_tokenizer_dir(texts: list[str], out: Path) -> None:
    """Train the report tokenizer on ``texts`` and save it to ``out`` (written to a temp dir, renamed)."""
    from hilt_scale.tokenizer import train_report_tokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    train_report_tokenizer(texts, vocab_size=TOKENIZER_VOCAB).save_pretrained(str(tmp))
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def build_default(
    cache: Path, n: int, size: tuple[int, int, int], seed: int, log: Callable[[str], None] | None = None
) -> tuple[str, str]:
    """Return (shard set, tokenizer dir) of the phantom default, building them first if absent."""
    entry = cache_entry(cache, n, size, seed)
    shards, tokenizer = entry / "shards", entry / "tokenizer"
    if (shards / "index.json").exists() and tokenizer.is_dir():
        return str(shards), str(tokenizer)
    from shards.phantom import generate_phantom
    from shards.write import write_shards

    if log:
        log(f"building the phantom default ({n} volumes of {size}) into {entry} ...")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{entry.name}."))
    try:
        generate_phantom(tmp / "ct-rate", n, size, seed=seed, workers=min(2, os.cpu_count() or 1))
        write_shards(
            tmp / "ct-rate", tmp / "shards", hr_size=size, samples_per_shard=SAMPLES_PER_SHARD, progress=False
        )
        train_tokenizer_dir(split_reports(tmp / "shards", "train"), tmp / "tokenizer")
        os.rename(tmp, entry)
    except OSError:
        if not (entry / "shards" / "index.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another builder won the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(shards), str(tokenizer)
