"""Reliability round 2 (issue 23): one error boundary per sample, bounded work per sample, checked
values, plain shard names. Each case failed on the tree before it (named in its docstring)."""

import json
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zstandard

from shards import ingest
from shards.ingest import DataError
from shards.read import ShardSet, decode_volume
from shards.verify import verify_shards
from shards.write import write_shards

REPORT = "Trachea and both main bronchi are open. No pleural effusion was detected on either side."
HR = (8, 16, 16)


def _nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms)
    img.to_filename(path)
    return path


def _manifest(d: Path, vols: dict[str, Path], reports: dict[str, str] | None = None) -> Path:
    rows = "".join(
        f'{p.name},"{(reports or {}).get(k, f"{REPORT} Item {k}.")}",train,{k}\n' for k, p in vols.items()
    )
    (d / "m.csv").write_text("path,report,split,id\n" + rows)
    return d / "m.csv"


def _good(d: Path, n: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    return {
        f"g{i}": _nifti(d / f"g{i}.nii.gz", rng.integers(-1000, 200, HR).astype(np.int16)) for i in range(n)
    }


@pytest.fixture
def shard_set(tmp_path: Path) -> Path:
    out = tmp_path / "sh"
    write_shards(
        _manifest(tmp_path, _good(tmp_path, 4)), out, hr_size=HR, samples_per_shard=2, progress=False
    )
    return out


def _vol_member(out: Path, shard: int = 0, sample: int = 0) -> tuple[Path, int, int, str]:
    s = json.loads((out / "index.json").read_text())["shards"][shard]
    offset, size = s["members"][sample]["vol.zst"]
    return out / s["name"], offset, size, s["keys"][sample]


# ---- decompression: capped at shape x dtype ----


def test_one_byte_in_the_frame_descriptor_is_a_data_error_naming_shard_and_key(shard_set):
    """Case 2: byte offset+4 of vol.zst set to 0xC0 gave a bare MemoryError (no file, no key)."""
    path, offset, _, key = _vol_member(shard_set)
    with open(path, "r+b") as f:
        f.seek(offset + 4)
        f.write(b"\xc0")
    with pytest.raises(DataError) as e:
        ShardSet(shard_set).read(0, 0)
    assert e.value.reason in ("corrupt_zstd", "bad_shape_or_dtype") and key in str(e.value)
    assert str(path) in str(e.value)


def test_a_decompression_bomb_never_allocates_beyond_shape_times_dtype():
    """Case 3: a 64 KB frame that decodes to 256 MiB was decompressed in full before the size check."""
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(256 << 20))
    unsized = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(256 << 20))
    assert len(bomb) < 64 << 10
    tracemalloc.start()
    try:
        for frame in (bomb, unsized):
            with pytest.raises(DataError) as e:
                decode_volume(frame, list(HR), "uint8", "x.tar", "k")
            assert "x.tar" in str(e.value) and "[key k]" in str(e.value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_any_failure_inside_a_read_is_a_counted_data_error(shard_set):
    """Case 1: anything but our own DataError (here a damaged members entry) escaped the reader."""
    index = json.loads((shard_set / "index.json").read_text())
    index["shards"][0]["members"][1] = {"json": "oops", "txt": [0, 1], "vol.zst": [0, 1]}
    (shard_set / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="g1"):
        ShardSet(shard_set).read(0, 1)
    from shards.read import ShardLoader

    loader = ShardLoader(shard_set, batch_size=2, shuffle=False, on_error="skip")
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == ["g0", "g2", "g3"] and sum(loader.skipped.values()) == 1


def test_index_shard_names_must_be_plain_files_inside_the_set(shard_set, tmp_path):
    """Minor case: an absolute path as a shard name was read, and verify said ok."""
    index = json.loads((shard_set / "index.json").read_text())
    outside = tmp_path / "elsewhere.tar"
    (shard_set / index["shards"][0]["name"]).rename(outside)
    for name in (str(outside), "../elsewhere.tar", "sub/x.tar"):
        index["shards"][0]["name"] = name
        (shard_set / "index.json").write_text(json.dumps(index))
        with pytest.raises(DataError, match="plain file name"):
            ShardSet(shard_set)
        assert not verify_shards(shard_set)["ok"]


# ---- the writer: one boundary per sample ----


def _write(tmp_path: Path, vols: dict[str, Path], on_error: str = "skip", **kw) -> dict:
    return write_shards(
        _manifest(tmp_path, vols, kw.pop("reports", None)),
        tmp_path / kw.pop("out", "out"),
        hr_size=HR,
        on_error=on_error,
        progress=False,
        **kw,
    )


def test_any_exception_of_one_volume_is_counted_and_the_others_written(tmp_path, monkeypatch):
    """Case 7/8: a MemoryError or another exception outside DataError killed the whole write."""
    vols = _good(tmp_path, 3)
    real = ingest.load_canonical

    def flaky(rec, rescale="auto"):
        if rec.key == "g0":
            raise MemoryError("cannot allocate")
        if rec.key == "g1":
            raise OverflowError("cannot convert float infinity to integer")
        return real(rec, rescale)

    monkeypatch.setattr("shards.write.load_canonical", flaky)
    index = _write(tmp_path, vols)
    s = index["summary"]
    assert s["written"] == 1 and s["dropped"] == {"out_of_memory": 1, "unreadable_sample": 1}
    assert s["unaccounted"] == 0 and any("g1.nii.gz [key g1]" in e for e in s["errors"])
    with pytest.raises(DataError, match=r"g0\.nii\.gz \[key g0\]"):  # raise: the default, naming the file
        _write(tmp_path, vols, on_error="raise", out="out2")


@pytest.mark.parametrize("zooms", [(750.0, 750.0, 1500.0), (1e30, 1.0, 1.0), (0.001, 1.0, 1.0)])
def test_spacing_outside_a_plausible_range_is_bad_spacing(tmp_path, zooms):
    """Case 7: pixdim in micrometres tried to allocate ~100 GB at the paper grid; 1e30 overflowed torch."""
    vols = _good(tmp_path, 1)
    vols["um"] = _nifti(tmp_path / "um.nii.gz", np.zeros(HR, np.int16) - 500, zooms)
    index = _write(tmp_path, vols, fov_mm=384.0)
    assert index["summary"]["written"] == 1 and index["summary"]["dropped"] == {"bad_spacing": 1}


def test_header_dims_are_checked_against_the_budget_before_any_read(tmp_path, monkeypatch):
    """Case 8: the size of a volume was only known after reading all of it."""
    path = tmp_path / "big.nii"
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    path.write_bytes(header.binaryblock + b"\0" * 4)  # dims say 128 GiB; the file holds nothing
    rec = ingest.Record("big", path, REPORT, "train", "nifti")
    with pytest.raises(DataError, match="too_large") as e:
        ingest.load_canonical(rec)
    assert str(path) in str(e.value)


def test_complex_voxels_are_refused(tmp_path):
    """Case 10 (values): a complex64 volume was silently cast to its real part."""
    data = (np.ones(HR) + 1j).astype(np.complex64)
    path = _nifti(tmp_path / "c.nii.gz", data)
    with pytest.raises(DataError, match="bad_dtype"):
        ingest.load_canonical(ingest.Record("c", path, REPORT, "train", "nifti"))


def test_degenerate_reports_are_empty_reports(tmp_path):
    """Minor case: reports of only NULs, dots or zero-width spaces were accepted for training."""
    reports = ["\x00" * 40, ". " * 30, "\u200b" * 30, f"{REPORT} Kept."]
    recs = [
        ingest.Record(f"k{i}", tmp_path / f"k{i}.nii.gz", r, "train", "nifti") for i, r in enumerate(reports)
    ]
    summary = ingest.Summary(found=4)
    kept = ingest.filter_records(recs, summary, "skip")
    assert [r.key for r in kept] == ["k3"] and summary.dropped == {"empty_report": 3}


def test_a_write_where_every_volume_fails_exits_with_no_samples(tmp_path):
    """Minor case: every volume failing gave exit 0 and an index listing an empty shard."""
    bad = {"b0": tmp_path / "b0.nii.gz"}
    bad["b0"].write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="no_samples"):
        _write(tmp_path, bad)
    assert not (tmp_path / "out" / "index.json").exists()


# ---- memory per volume ----


def test_preprocess_peak_memory_stays_under_four_times_the_int16_input(tmp_path):
    """Case 8: whole-volume float64 / float32 / transposed copies made one scan cost ~5x its size."""
    shape = (96, 128, 120)  # (i, j, k) of the file; canonical is reversed (LPS -> LPI transposes)
    data = np.random.default_rng(1).integers(-1000, 1000, shape).astype(np.int16)
    path = _nifti(tmp_path / "big.nii", data)  # uncompressed: no gzip buffers in the measure
    del data
    rec = ingest.Record("big", path, REPORT, "train", "nifti")
    size = int(np.prod(shape)) * 2
    tracemalloc.start()
    try:
        hu, spacing = ingest.load_canonical(rec)
        arr, _ = ingest.preprocess(hu, spacing, (16, 32, 32), "uint8", target_spacing=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert arr.shape == (16, 32, 32)
    assert peak < 4 * size, f"peak {peak / size:.2f}x the int16 input"


# ---- CT-RATE values ----


def _ctrate(tmp_path: Path) -> Path:
    from shards.phantom import generate_phantom

    root = tmp_path / "ct"
    generate_phantom(root, n=6, size=HR, seed=5)
    return root


def _edit_csv(path: Path, name: str, column: str, value: str) -> None:
    import csv

    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    for r in rows:
        if r["VolumeName"] == name:
            r[column] = value
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_ctrate_slope_zero_and_labels_other_than_0_or_1_are_refused_naming_the_cell(tmp_path):
    """Case 6: RescaleSlope 0 stored an all-zero volume; a label 'inf' raised OverflowError under skip."""
    root = _ctrate(tmp_path)
    names = sorted(p.name for p in (root / "train").rglob("*.nii.gz"))
    _edit_csv(root / "metadata" / "train_metadata.csv", names[0], "RescaleSlope", "0")
    _edit_csv(root / "multi_abnormality_labels" / "train_predicted_labels.csv", names[1], "Emphysema", "inf")
    _edit_csv(root / "multi_abnormality_labels" / "train_predicted_labels.csv", names[2], "Cardiomegaly", "2")
    index = write_shards(root, tmp_path / "out", hr_size=HR, on_error="skip", progress=False)
    s = index["summary"]
    assert s["dropped"] == {"bad_labels": 2, "bad_metadata": 1}, s
    assert any("RescaleSlope = 0" in e for e in s["errors"])
    assert any("column 'Emphysema'" in e and "line " in e and "'inf'" in e for e in s["errors"])


# ---- the trainer's start-up pass over reports ----


def _rewrite_txt(out: Path, data: bytes) -> None:
    """Replace the report of sample 0 of shard 0 by ``data`` (same length) and fix the index crc."""
    index = json.loads((out / "index.json").read_text())
    s = index["shards"][0]
    offset, size = s["members"][0]["txt"]
    with open(out / s["name"], "r+b") as f:
        f.seek(offset)
        f.write(data[:size].ljust(size, b"\xff"))
    s["crc32"][0][1] = zlib.crc32(data[:size].ljust(size, b"\xff"))
    (out / "index.json").write_text(json.dumps(index))


def test_split_reports_counts_a_non_utf8_report_a_missing_and_a_truncated_shard(shard_set):
    """Case 4: UnicodeDecodeError / tarfile.ReadError / FileNotFoundError from the start-up pass."""
    from hilt_scale.training.data import split_reports

    _rewrite_txt(shard_set, b"\xff\xfe not utf-8")
    with pytest.raises(DataError, match=r"not_utf8.*\[key g0\]"):
        split_reports(shard_set, "train")
    skipped: Counter = Counter()
    assert len(split_reports(shard_set, "train", "skip", skipped)) == 3 and skipped == {"not_utf8": 1}
    index = json.loads((shard_set / "index.json").read_text())
    (shard_set / index["shards"][1]["name"]).unlink()
    skipped.clear()
    assert len(split_reports(shard_set, "train", "skip", skipped)) == 1
    assert skipped == {"not_utf8": 1, "missing_shard": 2}


def test_split_reports_on_a_truncated_shard(shard_set):
    from hilt_scale.training.data import split_reports

    index = json.loads((shard_set / "index.json").read_text())
    path = shard_set / index["shards"][1]["name"]
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(DataError, match="truncated_shard"):
        split_reports(shard_set, "train")
    skipped: Counter = Counter()
    assert len(split_reports(shard_set, "train", "skip", skipped)) == 2 and skipped == {"truncated_shard": 2}


# ---- never spin ----


def test_a_rank_with_no_good_sample_in_a_whole_pass_stops_counting_the_skips():
    """Hang case 1: every batch empty under --on-error skip made Batches.next loop forever."""
    from hilt_scale.training.loop import Batches

    class Loader:
        epoch = 0
        skipped = Counter({"corrupt_zstd": 6})

        def __len__(self):
            return 3

        def __iter__(self):
            yield from ({"key": []} for _ in range(3))

    with pytest.raises(DataError, match=r"no_good_samples.*corrupt_zstd.*6"):
        Batches(Loader()).next()

    class Unsized:
        epoch = 0

        def __iter__(self):
            yield from ({"key": []} for _ in range(2))

    with pytest.raises(DataError, match="no_good_samples"):
        Batches(Unsized()).next()


# ---- ownership and locks ----


def test_a_tar_the_writer_did_not_write_is_never_overwritten(tmp_path):
    """Case 9: a user's own train-000000.tar in --out was silently overwritten."""
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "train-000000.tar"
    mine.write_bytes(b"the user's own archive")
    with pytest.raises(DataError, match="not_ours") as e:
        _write(tmp_path, _good(tmp_path, 2))
    assert str(mine) in str(e.value) and mine.read_bytes() == b"the user's own archive"


def test_a_second_writer_into_the_same_out_is_refused_naming_the_first(tmp_path):
    """Minor case: two writers into one --out interleaved their files (no lock)."""
    from shards.io import lock_dir

    fd = lock_dir(tmp_path / "out", "another writer")
    try:
        with pytest.raises(RuntimeError, match="in use by another writer"):
            _write(tmp_path, _good(tmp_path, 2))
    finally:
        import os

        os.close(fd)
    assert _write(tmp_path, _good(tmp_path, 2))["summary"]["written"] == 2  # free again


def test_plane_by_plane_resampling_matches_torch_trilinear():
    """The bounded resampler keeps the earlier torch interpolate result (to rounding)."""
    import torch

    rng = np.random.default_rng(3)
    for shape, out in [((20, 30, 40), (8, 16, 16)), ((5, 7, 9), (12, 13, 20)), ((9, 16, 16), (9, 16, 16))]:
        hu = rng.uniform(-1200, 400, shape).astype(np.float32)
        got, _ = ingest.preprocess(
            hu[::-1].transpose(0, 2, 1)[::-1].transpose(0, 2, 1), (1, 1, 1), out, "int16"
        )
        ref = np.clip(hu, -1024, 3071)[None, None]  # int16 keeps HU above the window
        want = torch.nn.functional.interpolate(torch.from_numpy(ref), size=out, mode="trilinear")[
            0, 0
        ].numpy()
        assert np.abs(got.astype(np.float32) - want).max() <= 0.5 + 1e-3


def test_sigterm_to_shards_write_stops_its_workers(tmp_path):
    """Minor case: SIGTERM to `shards.write` left its spawn workers writing on, orphaned."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from shards.phantom import generate_phantom

    generate_phantom(tmp_path / "ct", n=12, size=(16, 64, 64), seed=1)
    root = Path(__file__).parents[1]
    cmd = [sys.executable, "-m", "shards.write", "--ct-rate", str(tmp_path / "ct"), "--out", str(tmp_path / "o"),
           "--hr-size", "64,256,256", "--workers", "2", "--samples-per-shard", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stderr=subprocess.PIPE
    )

    def children() -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    workers: list[int] = []
    while proc.poll() is None and len(workers) < 3:  # two workers + the resource tracker
        workers = children()
        time.sleep(0.2)
    assert proc.poll() is None, "the write finished before the workers were seen; make it bigger"
    time.sleep(1.0)  # let the workers start on a shard
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    proc.stderr.close()
    alive = []
    for pid in workers:
        try:
            os.kill(pid, 0)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
                alive.append(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass
    assert alive == [], f"workers {alive} outlived shards.write"
    assert not (tmp_path / "o" / "index.json").exists()


def test_a_full_disk_in_shards_write_is_one_line_naming_out(tmp_path, monkeypatch, capsys):
    """Minor case: disk full in shards.write gave a traceback without a path."""
    import errno

    from shards import write

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write, "write_shards", full)
    with pytest.raises(SystemExit) as e:
        write.main(["--nifti-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and str(tmp_path / "o") in err and "No space left" in err
