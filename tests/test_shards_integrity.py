"""Integrity: a rerun after the source changed, corrupted bytes on every read path, verify's cross-checks."""

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zstandard

from shards.ingest import DataError
from shards.read import ShardLoader, ShardSet
from shards.verify import verify_shards
from shards.write import write_shards

REPORT = "Trachea and both main bronchi are open. No pleural effusion was detected on either side."
HR = (8, 16, 16)


def _manifest(d: Path, n: int) -> Path:
    """n noisy volumes (so zstd has real entropy to protect) and a manifest listing them."""
    rows = []
    for i in range(n):
        vol = d / f"v{i}.nii.gz"
        if not vol.exists():
            data = np.random.default_rng(i).integers(-1000, 200, (8, 16, 16)).astype(np.int16)
            nib.Nifti1Image(data, np.eye(4)).to_filename(vol)
        rows.append(f"{vol.name},{REPORT} Item {i}.,train,k{i}\n")
    (d / "m.csv").write_text("path,report,split,id\n" + "".join(rows))
    return d / "m.csv"


def test_rerun_after_the_source_grew_shrank_or_changed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = _manifest(tmp_path, 4)
    write_shards(m, out, hr_size=HR, samples_per_shard=2, progress=False)
    index = write_shards(_manifest(tmp_path, 8), out, hr_size=HR, samples_per_shard=2, progress=False)
    s = index["summary"]
    assert (s["found"], s["written"], s["dropped"], s["unaccounted"]) == (8, 8, {}, 0)
    keys = ShardSet(out).keys()
    assert sorted(keys) == sorted(f"k{i}" for i in range(8)) and len(keys) == len(set(keys))
    assert verify_shards(out)["ok"]
    # Shrink: shards of the earlier plan are removed, not left beside the index.
    index = write_shards(_manifest(tmp_path, 3), out, hr_size=HR, samples_per_shard=2, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert index["summary"]["stale_shards_removed"] == ["train-000002.tar", "train-000003.tar"]
    assert sorted(ShardSet(out).keys()) == ["k0", "k1", "k2"] and verify_shards(out)["ok"]
    # An input replaced in place (same name, new content): its shard is rewritten, the other reused.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    data = np.full((8, 16, 16), 100, np.int16)
    nib.Nifti1Image(data, np.eye(4)).to_filename(tmp_path / "v2.nii.gz")
    os.utime(tmp_path / "v2.nii.gz", ns=(1, 1))
    write_shards(m.parent / "m.csv", out, hr_size=HR, samples_per_shard=2, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert after["train-000000.tar"] == before["train-000000.tar"]
    assert after["train-000001.tar"] != before["train-000001.tar"]
    assert (ShardSet(out).load("k2")["hr"] == ShardSet(out).load("k2")["hr"].flat[0]).all()


def test_verify_catches_a_key_in_two_shards_and_unlisted_tars(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(_manifest(tmp_path, 4), out, hr_size=HR, samples_per_shard=2, progress=False)
    index = json.loads((out / "index.json").read_text())
    # Copy shard 0 over shard 1 and make the index agree with the files: every per-shard check passes.
    shutil.copy(out / "train-000000.tar", out / "train-000001.tar")
    index["shards"][1] = {**index["shards"][0], "name": "train-000001.tar"}
    (out / "index.json").write_text(json.dumps(index))
    (out / "old-000000.tar").write_bytes(b"")
    report = verify_shards(out)
    assert not report["ok"] and any("duplicate across shards" in p for p in report["problems"])
    assert any("old-000000.tar" in w for w in report["warnings"])


def _flip_all(shard_dir: Path, member: str, n: int, seed: int) -> tuple[int, int]:
    """Flip n seeded single bytes (one at a time) in one sample's member; (detected, identical) counts."""
    shard_set = ShardSet(shard_dir)
    want = shard_set.read(0, 0)
    path = shard_dir / shard_set.shards[0]["name"]
    off, size = shard_set.shards[0]["members"][0][member]
    original = path.read_bytes()
    rng = np.random.default_rng(seed)
    detected = identical = 0
    for pos in rng.choice(size, size=min(n, size), replace=False):
        raw = bytearray(original)
        raw[off + int(pos)] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(raw))
        fresh = ShardSet(shard_dir)
        try:
            got = fresh.read(0, 0)
        except DataError as e:
            assert f"[key {want['key']}]" in str(e) and path.name in str(e)
            detected += 1
        else:
            assert np.array_equal(got["hr"], want["hr"]) and got["report"] == want["report"], int(pos)
            assert got["meta"] == want["meta"]
            identical += 1
        fresh.close()
    path.write_bytes(original)
    return detected, identical


def test_every_flipped_byte_is_detected_or_harmless(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(_manifest(tmp_path, 4), out, hr_size=HR, samples_per_shard=2, progress=False)
    detected, identical = _flip_all(out, "vol.zst", 50, seed=0)
    # Only a flip in the frame header's spare bits can leave the volume intact; it is then harmless.
    assert detected + identical == 50 and detected >= 45, (detected, identical)
    for member in ("json", "txt"):
        detected, identical = _flip_all(out, member, 20, seed=1)
        assert detected == 20, member
    # The training path: raise naming shard and key, or skip and count.
    path = out / "train-000000.tar"
    shard = json.loads((out / "index.json").read_text())["shards"][0]
    off, size = shard["members"][1]["vol.zst"]
    raw = bytearray(path.read_bytes())
    raw[off + size // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"train-000000.tar \[key {shard['keys'][1]}\]"):
        list(ShardLoader(out, "train", batch_size=2, shuffle=False))
    loader = ShardLoader(out, "train", batch_size=2, shuffle=False, on_error="skip")
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 3 and sum(loader.skipped.values()) == 1


def test_shards_without_zstd_checksums_are_checked_by_sha256(tmp_path: Path) -> None:
    """Shards written before checksums: every flip is still caught, by the json's sha256 of the array."""
    out = tmp_path / "out"
    write_shards(_manifest(tmp_path, 2), out, hr_size=HR, samples_per_shard=2, progress=False)
    from tests.test_shards_write_read import _handmade_set

    shard_set = ShardSet(out)
    samples = []
    for j in range(2):
        s = shard_set.read(0, j)
        samples.append((s["key"], s["meta"], s["hr"].tobytes()))
    old = _handmade_set(tmp_path / "old", samples, list(HR), "uint8")  # frames without checksum
    raw = (old / "train-000000.tar").read_bytes()
    assert not zstandard.get_frame_parameters(
        raw[ShardSet(old).shards[0]["members"][0]["vol.zst"][0] :]
    ).has_checksum
    detected, identical = _flip_all(old, "vol.zst", 50, seed=2)
    assert detected + identical == 50 and detected >= 45, (detected, identical)
