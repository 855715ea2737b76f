"""Stream a shard set to every rank: exact epochs, balanced ranks, an exact resume point.

`ShardLoader` assigns SAMPLES (not shards) to ranks: each epoch one seeded permutation of the
split, shared by all ranks, is dealt out round-robin, so every sample is read exactly once per
epoch whatever the number of shards, ranks and workers. Every rank gets the same number of
batches (ceil(N / (world_size * batch_size))); when N does not divide evenly some of the last
batches are one sample short. The index records each member's byte offset, so a sample is read
with one `pread` and resuming skips samples without opening them. Batch i of a rank is built
by DataLoader worker i % num_workers; DataLoader hands them out in order.

`wds_dataset` is the plain webdataset pipeline over the same tars (split_by_node, split_by_worker,
seeded shuffle buffer, zstd decoding) for tools that expect webdataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import zstandard
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.batch import stack_batch
from shards.ingest import DTYPES, DataError, array_sha256, as_data_error, check_policy

# Hard cap on one decoded volume, whatever its json says (a decompression bomb never gets more).
MAX_VOLUME_BYTES = 4 << 30
# A shard named in index.json must be a plain file name inside the set: no path, no dot file.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,200}")


def frame_has_checksum(data: bytes) -> bool:
    """True when a zstd frame carries a content checksum (then decompression verifies it)."""
    try:
        return bool(zstandard.get_frame_parameters(data).has_checksum)
    except zstandard.ZstdError:
        return False


def decode_volume(
    data: bytes, shape: list[int], dtype: str, file: str | Path, key: str, sha256: str | None = None
) -> np.ndarray:
    """Decompress one zstd frame into a (D, H, W) array, checking its size against shape and dtype.

    A frame with a content checksum is verified by zstd itself. A frame without one (shards
    written before checksums, or a header whose checksum flag was damaged) is checked against
    ``sha256`` (the sample json's hash of the array) when given, so no damaged volume passes.
    """
    if dtype not in DTYPES:
        raise DataError("bad_shape_or_dtype", file, key, f"dtype {dtype!r} not one of {sorted(DTYPES)}")
    want = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if want > MAX_VOLUME_BYTES:
        raise DataError("too_large", file, key, f"shape {shape} {dtype} is {want} bytes > {MAX_VOLUME_BYTES}")
    # Decompression is capped at shape x dtype: a frame that declares another size (a damaged
    # frame descriptor, a bomb) is refused before any allocation; one without a declared size is
    # cut off at the cap.
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as e:
        raise DataError("corrupt_zstd", file, key, f"vol.zst frame header: {e}") from e
    if declared not in (want, zstandard.CONTENTSIZE_UNKNOWN):
        raise DataError(
            "bad_shape_or_dtype",
            file,
            key,
            f"frame declares {declared} bytes, shape {shape} {dtype} needs {want}",
        )
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=want)
    except zstandard.ZstdError as e:
        raise DataError("corrupt_zstd", file, key, f"vol.zst: {e} (at most {want} bytes allowed)") from e
    if len(raw) != want:
        raise DataError(
            "bad_shape_or_dtype", file, key, f"{len(raw)} bytes decoded, shape {shape} {dtype} needs {want}"
        )
    if sha256 is not None and not frame_has_checksum(data):
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise DataError(
                "checksum_mismatch", file, key, "decoded array sha256 differs from the sample json"
            )
    return np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)


def zstd_handler(key: str, data: bytes) -> bytes | None:
    """webdataset decoder handler: decompress members whose name ends in .zst (others untouched)."""
    if key.endswith("zst"):
        size = zstandard.get_frame_parameters(data).content_size
        if size != zstandard.CONTENTSIZE_UNKNOWN and size > MAX_VOLUME_BYTES:
            raise ValueError(f"{key}: frame declares {size} bytes > {MAX_VOLUME_BYTES}")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_VOLUME_BYTES)
    return None


class ShardSet:
    """A shard directory opened through its index.json: random access to samples by position."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = Path(path)
        index_path = self.root / "index.json"
        try:
            self.index = json.loads(index_path.read_text())
        except FileNotFoundError as e:
            raise DataError(
                "missing_index", index_path, "-", "no index.json: the writer did not finish"
            ) from e
        except json.JSONDecodeError as e:
            raise DataError("bad_index", index_path, "-", str(e)) from e
        for k in ("shards", "hr_size", "dtype"):
            if k not in self.index:
                raise DataError("bad_index", index_path, "-", f"missing key {k!r}")
        self.shards = self.index["shards"]
        for s in self.shards:
            name = s.get("name") if isinstance(s, dict) else None
            if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
                raise DataError(
                    "bad_index",
                    index_path,
                    "-",
                    f"shard name {name!r} is not a plain file name inside the set",
                )
        self.hr_size = list(self.index["hr_size"])
        self.dtype = self.index["dtype"]
        self._fds: dict[int, int] = {}

    @property
    def splits(self) -> dict[str, int]:
        """Sample count of each split present, from the shards listed in the index (e.g. {"train": 70, ...})."""
        out: dict[str, int] = {}
        for s in self.shards:
            out[s["split"]] = out.get(s["split"], 0) + s["count"]
        return {k: v for k, v in out.items() if v > 0}

    def has_split(self, split: str) -> bool:
        """True when the set holds at least one sample of ``split`` (e.g. "test" after a patient split)."""
        return self.splits.get(split, 0) > 0

    def entries(self, split: str) -> list[tuple[int, int]]:
        """(shard number, position) of every sample of a split, in index order."""
        out = [(i, j) for i, s in enumerate(self.shards) if s["split"] == split for j in range(s["count"])]
        if not out:
            have = sorted({s["split"] for s in self.shards})
            raise DataError(
                "empty_split", self.root / "index.json", "-", f"no samples in split {split!r}; splits: {have}"
            )
        return out

    def keys(self, split: str | None = None) -> list[str]:
        """All sample keys (of one split, or of all), in index order."""
        return [k for s in self.shards if split is None or s["split"] == split for k in s["keys"]]

    def _pread(self, i: int, offset: int, size: int, key: str) -> bytes:
        """Read bytes of shard i with pread (no shared file offset, safe after fork)."""
        path = self.root / self.shards[i]["name"]
        if i not in self._fds:
            try:
                self._fds[i] = os.open(path, os.O_RDONLY)
            except FileNotFoundError as e:
                raise DataError("missing_shard", path, key, "shard file does not exist") from e
        data = os.pread(self._fds[i], size, offset)
        if len(data) != size:
            raise DataError(
                "truncated_shard", path, key, f"wanted {size} bytes at offset {offset}, got {len(data)}"
            )
        return data

    def _where(self, i: int, j: int) -> tuple[Path | str, str]:
        """(shard path, key) of sample j of shard i, as far as the index can tell (for messages)."""
        try:
            return self.root / self.shards[i]["name"], str(self.shards[i]["keys"][j])
        except Exception:
            return self.root / "index.json", f"shard {i} sample {j}"

    def read(self, i: int, j: int, verify: bool | None = None) -> dict:
        """``_read`` inside the per-sample error boundary: any failure is a DataError naming shard and key."""
        try:
            return self._read(i, j, verify)
        except Exception as e:
            raise as_data_error(e, *self._where(i, j)) from e

    def read_report(self, i: int, j: int) -> str:
        """The report of sample j of shard i alone (crc32-checked, UTF-8), without its volume."""
        try:
            shard = self.shards[i]
            key, members = shard["keys"][j], shard["members"][j]
            path = self.root / shard["name"]
            if "txt" not in members:
                raise DataError("missing_member", path, key, "sample lacks ['txt']")
            txt = self._pread(i, *members["txt"], key)
            crc = shard.get("crc32")
            if crc is not None and zlib.crc32(txt) != crc[j][1]:
                raise DataError("checksum_mismatch", path, key, "txt member crc32 differs from the index")
            try:
                return txt.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError("not_utf8", path, key, f"txt member: {e}") from e
        except Exception as e:
            raise as_data_error(e, *self._where(i, j)) from e

    def _read(self, i: int, j: int, verify: bool | None = None) -> dict:
        """Sample j of shard i: {"key", "hr" (D, H, W array), "report", "meta"}.

        Every read detects damage: json and txt against the index's crc32 (shards from format 2),
        the volume by its zstd content checksum, or, for a frame without one, by the sha256 in the
        json. ``verify=True`` also recomputes the sha256 of every volume; ``verify=False`` skips
        the sha256 fallback (zstd and crc32 checks still run).
        """
        shard = self.shards[i]
        key = shard["keys"][j]
        members = shard["members"][j]
        path = self.root / shard["name"]
        missing = [m for m in ("json", "txt", "vol.zst") if m not in members]
        if missing:
            raise DataError("missing_member", path, key, f"sample lacks {missing}")
        js, txt = self._pread(i, *members["json"], key), self._pread(i, *members["txt"], key)
        crc = shard.get("crc32")
        if crc is not None:
            for member, data, want in (("json", js, crc[j][0]), ("txt", txt, crc[j][1])):
                if zlib.crc32(data) != want:
                    raise DataError(
                        "checksum_mismatch", path, key, f"{member} member crc32 differs from the index"
                    )
        try:
            meta = json.loads(js)
            report = txt.decode("utf-8")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError("corrupt_sample", path, key, str(e)) from e
        if list(meta.get("shape", [])) != self.hr_size or meta.get("dtype") != self.dtype:
            raise DataError(
                "bad_shape_or_dtype",
                path,
                key,
                f"sample is {meta.get('shape')} {meta.get('dtype')}, index says {self.hr_size} {self.dtype}",
            )
        sha = meta.get("sha256") if verify is not False else None
        hr = decode_volume(
            self._pread(i, *members["vol.zst"], key), meta["shape"], meta["dtype"], path, key, sha
        )
        if verify and array_sha256(hr) != meta.get("sha256"):
            raise DataError(
                "checksum_mismatch", path, key, "decoded array sha256 differs from the sample json"
            )
        return {"key": key, "hr": hr, "report": report, "meta": meta}

    def load(self, key: str) -> dict:
        """One sample by key (a linear search of the index: for tools, not for training)."""
        for i, s in enumerate(self.shards):
            if key in s["keys"]:
                return self.read(i, s["keys"].index(key))
        raise KeyError(f"{key!r} not in {self.root / 'index.json'}")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}  # file descriptors do not travel to workers


def open_shard_set(path: str | os.PathLike) -> ShardSet:
    """Open a shard directory by its index.json."""
    return ShardSet(path)


def epoch_plan(
    n: int, batch_size: int, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool
) -> list[list[int]]:
    """Sample numbers of each batch of this rank in this epoch; the same batch count on every rank.

    All ranks draw the same permutation (seed, epoch) and take every world_size-th sample, so
    the ranks partition the split. Batches per rank = ceil(n / (world_size * batch_size)); the
    rank's samples are spread over them, so some last batches are one short. Only when a rank has
    fewer samples than batches (batch_size 1 and n % world_size != 0) is one sample repeated.
    """
    if n < world_size:
        raise ValueError(f"{n} samples cannot feed {world_size} ranks")
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"bad rank/world_size/batch_size: {rank}/{world_size}/{batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    mine = [int(v) for v in order[rank::world_size]]
    nb = math.ceil(n / (world_size * batch_size))
    sizes = [len(mine) // nb + (b < len(mine) % nb) for b in range(nb)]
    plan, at = [], 0
    for size in sizes:
        plan.append(mine[at : at + size] if size else [mine[at % len(mine)]])
        at += size
    return plan


class _EpochStream(IterableDataset):
    """Batches start, start+1, ... of one rank's epoch plan; DataLoader worker w builds every K-th."""

    def __init__(self, shard_set: ShardSet, entries, plan, start: int, on_error: str) -> None:
        self.shard_set, self.entries, self.plan, self.start, self.on_error = (
            shard_set,
            entries,
            plan,
            start,
            on_error,
        )

    def __iter__(self) -> Iterator[tuple[dict, list[str]]]:
        info = get_worker_info()
        wid, k = (info.id, info.num_workers) if info is not None else (0, 1)
        for b in range(self.start + wid, len(self.plan), k):
            yield self.build(self.plan[b])

    def build(self, sample_ids: list[int]) -> tuple[dict, list[str]]:
        """Read and stack one batch; under policy 'skip' bad samples are left out and reported."""
        samples, skipped = [], []
        for s in sample_ids:
            try:
                samples.append(self.shard_set.read(*self.entries[s]))
            except DataError as e:
                if self.on_error == "raise":
                    raise
                skipped.append(f"{e.reason}\t{e}")
        return stack_batch(samples, self.shard_set.hr_size, self.shard_set.dtype), skipped


def _identity(x):
    return x


class ShardLoader:
    """Iterable of batches of one rank: {"key", "hr" [B, 1, D, H, W], "report", "meta"} or collate_fn(batch)."""

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        batch_size: int = 2,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        epoch: int = 0,
        collate_fn: Callable[[dict], object] | None = None,
        on_error: str = "raise",
    ) -> None:
        check_policy(on_error)
        self.shard_set = ShardSet(path)
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.collate_fn, self.on_error = collate_fn, on_error
        self.entries = self.shard_set.entries(split)
        self.epoch, self.position = epoch, 0
        self.skipped: Counter = Counter()  # reason -> count, under on_error="skip"
        self.skipped_messages: list[str] = []
        epoch_plan(len(self.entries), batch_size, rank, world_size, 0, seed, shuffle)  # validate early

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return math.ceil(len(self.entries) / (self.world_size * self.batch_size))

    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks together)."""
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle); a different epoch starts at its first batch."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        """The exact resume point: next batch = batch `position` of epoch `epoch`."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume where state_dict() was taken; the layout (seed, ranks, batch size) must match."""
        for k in ("seed", "world_size", "batch_size"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(
                    f"loader state has {k}={state[k]}, this loader has {getattr(self, k)}: cannot resume exactly"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator:
        plan = epoch_plan(
            len(self.entries),
            self.batch_size,
            self.rank,
            self.world_size,
            self.epoch,
            self.seed,
            self.shuffle,
        )
        stream = _EpochStream(self.shard_set, self.entries, plan, self.position, self.on_error)
        if self.num_workers > 0 and len(plan) - self.position > 0:
            source = DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity)
        else:
            source = stream
        for batch, skipped in source:
            for msg in skipped:
                reason, _, text = msg.partition("\t")
                self.skipped[reason] += 1
                if len(self.skipped_messages) < 50:
                    self.skipped_messages.append(text)
            self.position += 1
            yield self.collate_fn(batch) if self.collate_fn is not None else batch
        self.epoch, self.position = self.epoch + 1, 0


def wds_dataset(path: str | os.PathLike, split: str = "train", shuffle_buffer: int = 0, seed: int = 0):
    """A webdataset pipeline over a split's tars yielding {"key", "hr", "report", "meta"} samples.

    Shards are split by node (torch.distributed rank) and by DataLoader worker, so use at least
    ranks x workers shards; a shard-level split cannot balance ranks exactly (ShardLoader does).
    """
    import webdataset as wds

    shard_set = ShardSet(path)
    urls = [str(shard_set.root / s["name"]) for s in shard_set.shards if s["split"] == split]

    def to_sample(s: dict) -> dict:
        meta = json.loads(s["json"])
        hr = decode_volume(
            s["vol.zst"],
            meta["shape"],
            meta["dtype"],
            s.get("__url__", "?"),
            s["__key__"],
            meta.get("sha256"),
        )
        return {"key": s["__key__"], "hr": hr, "report": s["txt"].decode("utf-8"), "meta": meta}

    ds = wds.WebDataset(
        urls,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        shardshuffle=False,
        empty_check=False,
    )
    if shuffle_buffer > 0:
        ds = ds.shuffle(shuffle_buffer, rng=random.Random(seed))
    return ds.map(to_sample)
