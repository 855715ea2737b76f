"""Writer + reader: exact round trip, verify, rerun, ranks x workers coverage, resume, bad input."""

import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import zstandard

from shards.ingest import DataError, Record, load_canonical, preprocess
from shards.phantom import generate_phantom
from shards.read import ShardLoader, ShardSet, epoch_plan, wds_dataset
from shards.verify import verify_shards
from shards.write import write_shards

SIZE = (16, 32, 32)
HR = (8, 24, 24)  # resampled on write, so the round trip checks the preprocessing path too
OLD = {"split": "official", "fov_mm": None}  # the Python defaults: CT-RATE's own split, resize to HR
REPORT = "Trachea and both main bronchi are open. No pleural effusion was detected on either side."


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, n=13, size=SIZE, seed=11)
    return out


@pytest.fixture(scope="module")
def shard_dir(phantom: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(phantom, out, hr_size=HR, samples_per_shard=3, progress=False, **OLD)
    return out


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.rglob("*") if p.name.endswith(".tmp")]


def test_round_trip_every_voxel_and_counts(phantom: Path, shard_dir: Path) -> None:
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["splits"] == {"train": 10, "valid": 3}
    assert [s["count"] for s in index["shards"]] == [3, 3, 3, 1, 3]
    assert index["summary"]["dropped"] == {} and index["hr_size"] == list(HR)
    report = verify_shards(shard_dir)
    assert report["ok"] and report["samples"] == 13 and report["decoded"] == 13, report
    shard_set = ShardSet(shard_dir)
    reports = {}
    for split in ("train", "valid"):
        import csv

        with open(phantom / "radiology_text_reports" / f"{split}_reports.csv") as fh:
            reports |= {r["VolumeName"][: -len(".nii.gz")]: r["Findings_EN"] for r in csv.DictReader(fh)}
    for i, s in enumerate(shard_set.shards):
        for j, key in enumerate(s["keys"]):
            smp = shard_set.read(i, j)
            # Independent reference: read the NIfTI with nibabel and apply slope/intercept ourselves.
            img = nib.load(smp["meta"]["source"])
            raw = np.asarray(img.dataobj.get_unscaled(), np.float32) - 1024.0
            canon = np.ascontiguousarray(
                raw[:, :, ::-1].transpose(2, 1, 0)
            )  # stored LPS -> (S->I, A->P, R->L)
            hu, spacing = load_canonical(Record(key, Path(smp["meta"]["source"]), "", "", "", 1.0, -1024.0))
            assert np.array_equal(hu, canon)
            want, _ = preprocess(canon, spacing, HR, "uint8")
            assert smp["hr"].dtype == np.uint8 and np.array_equal(smp["hr"], want), key
            assert smp["report"] == reports[key]
            assert smp["meta"]["labels"] is not None and smp["meta"]["split"] == s["split"]


def test_rerun_does_not_rewrite_finished_shards(phantom: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    write_shards(phantom, out, hr_size=HR, samples_per_shard=5, progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    victim = sorted(first)[0]
    (out / victim).unlink()
    os.utime(out / "train-000001.tar", ns=(1, 1))
    write_shards(phantom, out, hr_size=HR, samples_per_shard=5, progress=False)
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert set(again) == set(first)
    assert again["train-000001.tar"] == 1  # untouched
    assert again[victim] != first[victim] or victim == "train-000001.tar"
    assert verify_shards(out)["ok"]


def test_epoch_plan_partitions_and_balances() -> None:
    for n, w, b in [(13, 2, 2), (10, 4, 3), (7, 2, 1), (100, 3, 4), (5, 5, 1)]:
        plans = [epoch_plan(n, b, r, w, epoch=1, seed=0, shuffle=True) for r in range(w)]
        assert len({len(p) for p in plans}) == 1  # every rank the same number of batches
        ids = [i for p in plans for batch in p for i in batch]
        if n % w == 0 or b > 1:
            assert sorted(ids) == list(range(n))  # exactly once
        else:
            assert set(ids) == set(range(n)) and len(ids) == len(plans[0]) * w  # one repeat per short rank
        assert all(1 <= len(batch) <= b for p in plans for batch in p)
    with pytest.raises(ValueError, match="cannot feed"):
        epoch_plan(1, 1, 0, 2, 0, 0, True)


@pytest.mark.slow
def test_two_ranks_two_workers_every_sample_once_per_epoch(shard_dir: Path) -> None:
    all_keys = ShardSet(shard_dir).keys("train")
    for epoch in (0, 1):
        seen: list[str] = []
        lengths = []
        for rank in range(2):
            loader = ShardLoader(
                shard_dir, "train", batch_size=2, rank=rank, world_size=2, num_workers=2, seed=4
            )
            loader.set_epoch(epoch)
            batches = list(loader)
            lengths.append((len(loader), len(batches)))
            for bt in batches:
                assert bt["hr"].shape[1:] == (1, *HR) and bt["hr"].shape[0] == len(bt["key"]) == len(
                    bt["report"]
                )
                seen += bt["key"]
        assert lengths[0] == lengths[1] and lengths[0][0] == lengths[0][1]
        assert sorted(seen) == sorted(all_keys)
        # The same ranks with 0 workers give the same batches in the same order.
        ref = [
            k
            for r in range(2)
            for bt in ShardLoader(shard_dir, "train", 2, rank=r, world_size=2, seed=4, epoch=epoch)
            for k in bt["key"]
        ]
        assert ref == seen


def test_resume_is_exact_and_skips_without_decoding(shard_dir: Path, monkeypatch) -> None:
    full = ShardLoader(shard_dir, "train", batch_size=2, seed=9, epoch=3)
    want = [bt["key"] for bt in full]
    assert full.state_dict()["epoch"] == 4 and full.state_dict()["position"] == 0
    part = ShardLoader(shard_dir, "train", batch_size=2, seed=9, epoch=3)
    it = iter(part)
    got = [next(it)["key"], next(it)["key"]]
    state = part.state_dict()
    assert state["position"] == 2 and state["epoch"] == 3
    reads = Counter()
    orig = ShardSet.read

    def counting(self, i, j, verify=False):
        reads[(i, j)] += 1
        return orig(self, i, j, verify)

    monkeypatch.setattr(ShardSet, "read", counting)
    resumed = ShardLoader(shard_dir, "train", batch_size=2, seed=9)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the trainer's per-epoch call must not reset a resumed position
    rest = [bt["key"] for bt in resumed]
    assert got + rest == want
    assert sum(reads.values()) == sum(len(k) for k in rest)  # skipped samples were never read
    other = ShardLoader(shard_dir, "train", batch_size=2, seed=9, epoch=5)
    assert [bt["key"] for bt in other] != want  # another epoch, another order
    with pytest.raises(ValueError, match="world_size"):
        ShardLoader(shard_dir, "train", 2, seed=9, world_size=2).load_state_dict(state)


def test_collate_fn_and_wds_pipeline_agree(shard_dir: Path) -> None:
    loader = ShardLoader(
        shard_dir, "valid", batch_size=2, shuffle=False, collate_fn=lambda b: (b["key"], b["hr"].sum())
    )
    out = list(loader)
    assert [k for keys, _ in out for k in keys] == ShardSet(shard_dir).keys("valid")
    by_key = {s["key"]: s for s in wds_dataset(shard_dir, "valid")}
    assert sorted(by_key) == sorted(ShardSet(shard_dir).keys("valid"))
    for keys, total in out:
        assert int(total) == sum(int(by_key[k]["hr"].astype(np.int64).sum()) for k in keys)


# ---- bad input in the reader ----


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _member(d: Path, shard: int, sample: int, member: str) -> tuple[Path, int, int]:
    s = json.loads((d / "index.json").read_text())["shards"][shard]
    off, size = s["members"][sample][member]
    return d / s["name"], off, size


def test_corrupt_zstd_frame_raise_or_skip(shard_dir: Path, tmp_path: Path) -> None:
    d = _copy(shard_dir, tmp_path / "c")
    path, off, size = _member(d, 0, 1, "vol.zst")
    with open(path, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\x00" * min(size, 16))
    bad_key = json.loads((d / "index.json").read_text())["shards"][0]["keys"][1]
    with pytest.raises(DataError, match=rf"corrupt_zstd: .*train-000000.tar \[key {bad_key}\]"):
        list(ShardLoader(d, "train", batch_size=3, shuffle=False))
    with pytest.raises(DataError, match=rf"corrupt_zstd: .*train-000000.tar \[key {bad_key}\]"):
        list(ShardLoader(d, "train", batch_size=3, shuffle=False, num_workers=2))  # raised in a worker
    loader = ShardLoader(d, "train", batch_size=3, shuffle=False, on_error="skip")
    keys = [k for bt in loader for k in bt["key"]]
    assert bad_key not in keys and len(keys) == 9 and loader.skipped == {"corrupt_zstd": 1}
    assert not verify_shards(d)["ok"]


def test_truncated_tar_raise_or_skip(shard_dir: Path, tmp_path: Path) -> None:
    d = _copy(shard_dir, tmp_path / "t")
    path, off, _ = _member(d, 1, 1, "json")
    with open(path, "r+b") as fh:
        fh.truncate(off + 10)
    with pytest.raises(DataError, match=r"truncated_shard: .*train-000001.tar \[key "):
        list(ShardLoader(d, "train", batch_size=2, shuffle=False))
    loader = ShardLoader(d, "train", batch_size=2, shuffle=False, on_error="skip")
    keys = [k for bt in loader for k in bt["key"]]
    assert len(keys) == 8 and loader.skipped == {"truncated_shard": 2}
    problems = verify_shards(d)["problems"]
    assert any("train-000001.tar" in p for p in problems)


def _handmade_set(d: Path, samples: list[tuple[str, dict, bytes]], hr_size, dtype: str) -> Path:
    """A shard set written by hand (not by write_shards) so a sample can lie about its shape/dtype."""
    from shards.write import _add, file_sha256, shard_members

    d.mkdir()
    with tarfile.open(d / "train-000000.tar", "w") as tf:
        for key, meta, vol in samples:
            _add(tf, f"{key}.json", json.dumps(meta).encode())
            _add(tf, f"{key}.txt", REPORT.encode())
            _add(tf, f"{key}.vol.zst", zstandard.ZstdCompressor().compress(vol))
    keys, members = shard_members(d / "train-000000.tar")
    tar = d / "train-000000.tar"
    index = {"version": 1, "hr_size": list(hr_size), "dtype": dtype, "splits": {"train": len(keys)}, "shards": [
        {"name": tar.name, "split": "train", "count": len(keys), "bytes": tar.stat().st_size, "sha256": file_sha256(tar), "keys": keys, "members": members}
    ]}  # fmt: skip
    (d / "index.json").write_text(json.dumps(index))
    return d


def test_wrong_shape_or_dtype_raise_or_skip(tmp_path: Path) -> None:
    good = np.arange(4 * 4 * 4, dtype=np.uint8).reshape(4, 4, 4)
    samples = [
        ("good0", {"shape": [4, 4, 4], "dtype": "uint8"}, good.tobytes()),
        ("shape", {"shape": [4, 4, 5], "dtype": "uint8"}, np.zeros((4, 4, 5), np.uint8).tobytes()),
        ("dtype", {"shape": [4, 4, 4], "dtype": "int16"}, good.astype(np.int16).tobytes()),
        ("liar", {"shape": [4, 4, 4], "dtype": "uint8"}, np.zeros(70, np.uint8).tobytes()),
        ("good1", {"shape": [4, 4, 4], "dtype": "uint8"}, good.tobytes()),
    ]
    d = _handmade_set(tmp_path / "h", samples, (4, 4, 4), "uint8")
    with pytest.raises(DataError, match=r"bad_shape_or_dtype: .*train-000000.tar \[key shape\]"):
        list(ShardLoader(d, "train", batch_size=5, shuffle=False))
    loader = ShardLoader(d, "train", batch_size=5, shuffle=False, on_error="skip")
    (batch,) = list(loader)
    assert batch["key"] == ["good0", "good1"] and loader.skipped == {"bad_shape_or_dtype": 3}
    assert np.array_equal(batch["hr"][1, 0].numpy(), good)


# ---- bad input in the writer ----


def _manifest_source(tmp_path: Path, bad: str) -> Path:
    """Manifest with three good volumes and one bad one (kind `bad`)."""
    rows = []
    for i in range(3):
        nib.Nifti1Image(np.full((6, 6, 6), i * 100 - 500, np.int16), np.eye(4)).to_filename(
            tmp_path / f"g{i}.nii.gz"
        )
        rows.append(f"g{i}.nii.gz,{REPORT} Item {i}.,train,g{i}")
    if bad == "nan":
        nib.Nifti1Image(np.full((6, 6, 6), np.nan, np.float32), np.eye(4)).to_filename(tmp_path / "b.nii.gz")
    elif bad == "2d":
        nib.Nifti1Image(np.zeros((6, 6), np.int16), np.eye(4)).to_filename(tmp_path / "b.nii.gz")
    elif bad == "corrupt":
        (tmp_path / "b.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    rows.insert(1, f"b.nii.gz,{REPORT} Bad one.,train,bad")
    (tmp_path / "m.csv").write_text("path,report,split,id\n" + "\n".join(rows) + "\n")
    return tmp_path / "m.csv"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [("nan", "non_finite"), ("2d", "not_3d"), ("corrupt", "unreadable_nifti"), ("missing", "missing_file")],
)
def test_writer_policy_raise_or_skip_loses_no_good_sample(tmp_path: Path, bad: str, reason: str) -> None:
    m = _manifest_source(tmp_path, bad)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"{reason}: .*(b.nii.gz|m.csv) \[key bad\]"):
        write_shards(m, out, hr_size=(4, 4, 4), samples_per_shard=2, progress=False)
    assert not (out / "index.json").exists() and not _leftovers(out)
    index = write_shards(m, out, hr_size=(4, 4, 4), on_error="skip", samples_per_shard=2, progress=False)
    assert index["summary"]["dropped"] == {reason: 1} and "[key bad]" in index["summary"]["errors"][0]
    assert sorted(ShardSet(out).keys()) == ["g0", "g1", "g2"] and not _leftovers(out)
    assert verify_shards(out)["ok"]


@pytest.mark.slow
def test_parallel_writer_matches_serial(phantom: Path, tmp_path: Path) -> None:
    a = write_shards(phantom, tmp_path / "a", hr_size=HR, samples_per_shard=4, workers=1, progress=False)
    b = write_shards(phantom, tmp_path / "b", hr_size=HR, samples_per_shard=4, workers=2, progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]  # byte-identical tars


def test_int16_shards_keep_clipped_hu(tmp_path: Path) -> None:
    m = _manifest_source(tmp_path, "missing")
    out = write_shards(
        m, tmp_path / "o", hr_size=(6, 6, 6), dtype="int16", on_error="skip", progress=False, **OLD
    )
    assert out["dtype"] == "int16"
    batch = next(iter(ShardLoader(tmp_path / "o", "train", batch_size=3, shuffle=False)))
    assert batch["hr"].dtype == torch.int16 and batch["key"] == ["g0", "g1", "g2"]
    assert [int(v) for v in batch["hr"][:, 0, 0, 0, 0]] == [-500, -400, -300]  # stored HU, inside the window


def test_bench_and_preview_commands(shard_dir: Path, tmp_path: Path, capsys) -> None:
    from shards.bench import main as bench_main
    from shards.preview import main as preview_main

    bench_main([str(shard_dir), "--workers", "1", "--repeats", "1"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    assert result["samples"] == 10 and result["speedup_vs_nibabel"] > 0 and 0 < result["bytes_ratio_vs_nifti"]
    png = tmp_path / "p.png"
    preview_main([str(shard_dir), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_round_trip_phantom_write_verify(tmp_path: Path, capsys) -> None:
    from shards import phantom, verify, write

    phantom.main(["--out", str(tmp_path / "ph"), "--n", "5", "--size", "8,16,16", "--seed", "2"])
    args = ["--ct-rate", str(tmp_path / "ph"), "--hr-size", "8,16,16", "--no-progress"]
    write.main([*args, "--out", str(tmp_path / "paper")])  # defaults: the paper's protocol
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    index = json.loads((tmp_path / "paper" / "index.json").read_text())
    assert index["preprocessing"]["split"] == "patient" and index["preprocessing"]["fov_mm"] == 384.0
    assert index["preprocessing"]["target_spacing"] == [48.0, 24.0, 24.0]
    assert sum(summary["splits"].values()) == 5 and set(summary["splits"]) <= {"train", "valid", "test"}
    write.main([*args, "--out", str(tmp_path / "sh"), "--official-split", "--stretch"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["splits"] == {"train": 4, "valid": 1}
    with pytest.raises(SystemExit) as ok:
        verify.main([str(tmp_path / "sh")])
    assert ok.value.code == 0
    (tmp_path / "sh" / "train-000000.tar").write_bytes(b"not a tar")
    with pytest.raises(SystemExit) as bad:
        verify.main([str(tmp_path / "sh")])
    assert bad.value.code == 1 and "train-000000.tar" in capsys.readouterr().out
