"""The run's data: the embedded default (built once into a cache), the report tokenizer, eval batches.

Without ``--data`` the embedded default is phantom volumes -> shards -> tokenizer. The phantom is written in CT-RATE's layout (NIfTI + report/metadata/label CSVs), so the real
ingestion path (``shards.write``) turns it into shards exactly as it would CT-RATE. The cache
entry appears in one rename when complete; concurrent builders (two "nodes" on one machine)
each build into their own temp directory and the loser discards its copy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hilt_scale.model.config import ModelConfig
    from hilt_scale.training.config import TrainConfig

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
    from hilt_scale.model.tokenizer import train_report_tokenizer

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


def prepare_data(cfg: TrainConfig, mcfg: ModelConfig, rank: int, local_rank: int) -> tuple[str, str | None]:
    """Shard set path and tokenizer directory (None: the LLM brings its own tokenizer).

    Without ``--data``: the cached phantom default at the model's HR size (or ``--phantom-size``).
    With a random-init LLM preset and no tokenizer, the report tokenizer is trained on the shard
    set's training reports and kept in the run directory.
    """
    from hilt_scale.training.distributed import barrier
    from shards.schema import parse_size

    if cfg.data is None:
        size = parse_size(cfg.phantom_size) if cfg.phantom_size else tuple(mcfg.resolution.hr_size)
        # One builder per node; the cache directory appears in one rename, so nodes never race.
        if local_rank == 0:
            build_default(Path(cfg.cache), cfg.phantom_n, size, cfg.seed, log=print if rank == 0 else None)
        barrier()
        return build_default(Path(cfg.cache), cfg.phantom_n, size, cfg.seed, log=None)
    data = str(cfg.data)
    if mcfg.llm.path or mcfg.llm.tokenizer_path:
        return data, None
    tokenizer_dir = Path(cfg.out) / "tokenizer"
    if rank == 0 and not tokenizer_dir.exists():
        train_tokenizer_dir(split_reports(data, "train"), tokenizer_dir)
    barrier()
    return data, str(tokenizer_dir)


def eval_batches(path: str, split: str, limit: int, batch: int, rank: int, world: int) -> Iterator[Any]:
    """This rank's eval batches: the first ``limit`` volumes of the split (0 = all) dealt round-robin.

    Every rank yields the same number of items (ZeRO-3 needs equal forward counts); a rank with
    no volumes left yields None. Volumes are read one batch at a time, never all at once.
    """
    from shards.batch import stack_batch
    from shards.read import ShardSet

    shard_set = ShardSet(path)
    entries = shard_set.entries(split)[: limit or None]
    mine = entries[rank::world]
    for i in range(math.ceil(math.ceil(len(entries) / world) / batch)):
        samples = [shard_set.read(*e) for e in mine[i * batch : (i + 1) * batch]]
        yield stack_batch(samples) if samples else None


def constant_report(reports: list[str]) -> str:
    """The most frequent training report (ties: the first seen): the constant-report baseline."""
    if not reports:
        raise ValueError("no training reports to pick a constant baseline from")
    return Counter(reports).most_common(1)[0][0]
