"""The run's data: the embedded default (built once into a cache), the report tokenizer, eval batches.

Without ``--data`` the embedded default is phantom volumes -> shards -> tokenizer. The phantom is written in CT-RATE's layout (NIfTI + report/metadata/label CSVs), so the real
ingestion path (``shards.write``) turns it into shards exactly as it would CT-RATE. The cache
entry appears in one rename when complete; concurrent builders (two "nodes" on one machine)
each build into their own temp directory and the loser discards its copy.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hilt_scale.model.config import ModelConfig
    from hilt_scale.training.config import TrainConfig

# Shards hold few volumes each so that ranks x loader workers always have shards to split.
SAMPLES_PER_SHARD = 8
TOKENIZER_VOCAB = 2048


def cache_entry(
    cache: Path, n: int, size: tuple[int, int, int], seed: int, lr_factor: int = 2, dtype: str = "uint8"
) -> Path:
    """Directory of one phantom build, named by everything that changes its content (including the
    generator's version, so a cache built by an older phantom is never reused silently, the HR/LR
    factor of its physics labels when it is not 2, and the shard dtype when it is not uint8)."""
    from shards.phantom import PHANTOM_VERSION

    name = f"phantom-v{PHANTOM_VERSION}-n{n}-{size[0]}x{size[1]}x{size[2]}-seed{seed}"
    name = name if lr_factor == 2 else f"{name}-lr{lr_factor}"
    return cache / (name if dtype == "uint8" else f"{name}-{dtype}")


def split_reports(
    path: str | Path, split: str, on_error: str = "raise", skipped: Counter | None = None
) -> list[str]:
    """The reports (``txt`` members) of one split of a shard set, read without decoding volumes.

    Each report is read through the index (``ShardSet.read_report``: crc32-checked, UTF-8), so a
    missing or truncated shard or a damaged report is a ``DataError`` naming shard and key:
    raised under ``on_error="raise"``, counted by reason in ``skipped`` under ``"skip"``.
    """
    from shards.ingest import DataError
    from shards.read import ShardSet

    path = Path(path)
    index_path = path / "index.json"
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} is missing: {path} is not a finished shard set")
    shard_set = ShardSet(path)
    reports = []
    try:
        for i, j in shard_set.entries(split):
            try:
                reports.append(shard_set.read_report(i, j))
            except DataError as e:
                if on_error == "raise":
                    raise
                if skipped is not None:
                    skipped[e.reason] += 1
    finally:
        shard_set.close()
    if not reports:
        raise ValueError(
            f"{index_path}: split {split!r} has no readable reports (splits: {shard_set.index.get('splits')}"
            + (f"; skipped {dict(skipped)}" if skipped else "")
            + ")"
        )
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
    cache: Path,
    n: int,
    size: tuple[int, int, int],
    seed: int,
    log: Callable[[str], None] | None = None,
    lr_factor: int = 2,
    dtype: str = "uint8",
) -> tuple[str, str]:
    """Return (shard set, tokenizer dir) of the phantom default, building them first if absent;
    ``lr_factor`` is the HR/LR ratio its physics labels (lr_fill, visibility) are computed at,
    ``dtype`` the shards' (int16 = HU, for an encoder that reads HU above the paper's window)."""
    entry = cache_entry(cache, n, size, seed, lr_factor, dtype)
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
        workers = min(2, os.cpu_count() or 1)
        generate_phantom(tmp / "ct-rate", n, size, seed=seed, workers=workers, lr_factor=lr_factor)
        write_shards(
            tmp / "ct-rate",
            tmp / "shards",
            hr_size=size,
            dtype=dtype,
            samples_per_shard=SAMPLES_PER_SHARD,
            progress=False,
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
    from hilt_scale.model.config import lr_factor, shard_dtype
    from hilt_scale.training.distributed import barrier
    from shards.schema import parse_size

    if cfg.data is None:
        size = parse_size(cfg.phantom_size) if cfg.phantom_size else tuple(mcfg.resolution.hr_size)
        # The physics labels at the LR view this run uses (its LR size against the phantom's grid).
        factor = lr_factor(mcfg.resolution, size)
        dtype = shard_dtype(mcfg.vision)  # HU shards when the encoder reads above the paper's window
        # One builder per node; the cache directory appears in one rename, so nodes never race.
        if local_rank == 0:
            log = print if rank == 0 else None
            build_default(Path(cfg.cache), cfg.phantom_n, size, cfg.seed, log, factor, dtype)
        barrier()
        return build_default(Path(cfg.cache), cfg.phantom_n, size, cfg.seed, None, factor, dtype)
    data = str(cfg.data)
    if mcfg.llm.path or mcfg.llm.tokenizer_path:
        return data, None
    tokenizer_dir = Path(cfg.out) / "tokenizer"
    if rank == 0 and not tokenizer_dir.exists():
        train_tokenizer_dir(split_reports(data, "train", cfg.on_error, Counter()), tokenizer_dir)
    barrier()
    return data, str(tokenizer_dir)


def constant_report(reports: list[str]) -> str:
    """The most frequent training report (ties: the first seen): the constant-report baseline."""
    if not reports:
        raise ValueError("no training reports to pick a constant baseline from")
    return Counter(reports).most_common(1)[0][0]


def check_hr_size(mcfg: ModelConfig, *paths: str) -> None:
    """Refuse a shard set whose HR volumes are not the model's ``resolution.hr_size``, naming both."""
    from shards.read import ShardSet

    want = list(mcfg.resolution.hr_size)
    for path in dict.fromkeys(paths):
        have = ShardSet(path).hr_size
        if list(have) != want:
            raise ValueError(
                f"{path}: the shards hold HR volumes of {tuple(have)} (D, H, W) but the model's "
                f"resolution.hr_size is {tuple(want)} (resolution {mcfg.resolution.name!r}); write the "
                "shards at that size or pick the matching --resolution / --set resolution.hr_size=D,H,W"
            )


def eval_splits(path: str, split: str) -> tuple[str, str]:
    """(final evaluation split, model-selection split) of a shard set.

    ``auto`` -> ``test`` when the index lists a test split, else ``valid``. Periodic evaluations
    during training select the model, so they use ``valid`` (when present) if the final is ``test``.
    """
    from shards.read import ShardSet

    shard_set = ShardSet(path)
    final = split if split != "auto" else ("test" if shard_set.has_split("test") else "valid")
    select = "valid" if final == "test" and shard_set.has_split("valid") else final
    return final, select


def percentile_nearest_rank(values: list[int], q: float) -> int:
    """The q-th percentile (0-100) by nearest rank: the smallest value >= q % of the values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def length_plan(reports: list[str], collator: Any, max_new_tokens: int | None) -> dict:
    """Report lengths in the model's tokens (eos included) against the sequence budget.

    ``collator.report_budget`` = max_length - prompt - visual tokens. Returns ``train_reports``,
    ``report_tokens_p99`` / ``_max``, ``report_budget``, ``truncated`` (training reports longer
    than the budget: the collator cuts them, counted here), ``max_new_tokens`` (given, else the
    99th percentile capped by the budget) and ``warnings``. A given ``max_new_tokens`` over the
    budget is an error: the generated report would not fit the configured sequence.
    """
    budget = collator.report_budget
    if max_new_tokens is not None and not 1 <= max_new_tokens <= budget:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} does not fit the sequence budget: max_length leaves "
            f"{budget} report tokens after the prompt and visual tokens (raise --set max_length=N)"
        )
    if not reports:
        raise ValueError("no training reports to measure")
    ids = collator.tokenizer(list(reports), add_special_tokens=False)["input_ids"]
    lengths = [len(x) + 1 for x in ids]  # + eos, as collator.report_length counts
    p99 = percentile_nearest_rank(lengths, 99)
    plan = {
        "train_reports": len(lengths),
        "report_tokens_p99": p99,
        "report_tokens_max": max(lengths),
        "report_budget": budget,
        "truncated": sum(n > budget for n in lengths),
        "max_new_tokens": max_new_tokens if max_new_tokens is not None else min(p99, budget),
        "max_new_tokens_from": "flag" if max_new_tokens is not None else "data (p99)",
        "warnings": [],
    }
    if plan["truncated"]:
        plan["warnings"].append(
            f"{plan['truncated']} of {len(lengths)} training reports are longer than the {budget} tokens "
            f"max_length leaves after the prompt and visual tokens (99th percentile {p99}, longest "
            f"{plan['report_tokens_max']}): they are truncated in training"
            + (", and generation stops at the budget" if p99 > budget else "")
            + "; raise --set max_length=N to keep them whole"
        )
    return plan
