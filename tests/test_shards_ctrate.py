"""The paper's CT-RATE protocol: pooled folders, one reconstruction per scan, patient split, 384 mm FOV."""

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shards.ctrate import parse_volume_name
from shards.ingest import DataError, assign_split, fov_spacing, load_canonical, preprocess, source_records
from shards.phantom import generate_phantom, volume_path
from shards.read import ShardSet
from shards.verify import verify_shards
from shards.write import PAPER, write_shards

REAL = Path(__file__).parents[2] / "shared" / "data" / "real_ct"
REPORT = "Trachea and both main bronchi are open. No pleural effusion was detected on either side."


def _edit_rows(path: Path, edit) -> None:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    rows = edit(rows)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _add_volume(root: Path, src: str, new: str, extra: str = "") -> None:
    """A copy of volume src named new, with src's rows (report + extra text) in every CSV."""
    dst = volume_path(root, f"{new}.nii.gz")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(volume_path(root, f"{src}.nii.gz"), dst)
    split = src.split("_")[0]
    for folder, suffix in [
        ("radiology_text_reports", "reports"),
        ("metadata", "metadata"),
        ("multi_abnormality_labels", "predicted_labels"),
    ]:

        def edit(rows, folder=folder):
            row = dict(next(r for r in rows if r["VolumeName"] == f"{src}.nii.gz"))
            row["VolumeName"] = f"{new}.nii.gz"
            if folder == "radiology_text_reports":
                row["Findings_EN"] += extra
            return [*rows, row]

        _edit_rows(root / folder / f"{split}_{suffix}.csv", edit)


@pytest.fixture
def ctrate(tmp_path: Path) -> Path:
    root = tmp_path / "ct"
    generate_phantom(root, n=12, size=(8, 16, 16), seed=3)
    _add_volume(root, "train_1_a_1", "train_1_a_2")  # second reconstruction: same scan, same report
    _add_volume(root, "train_1_a_1", "train_1_b_1", " A second scan a year later.")  # same patient
    _add_volume(root, "train_2_a_1", "train_2_a_3")
    return root


def test_pooled_one_reconstruction_per_scan_split_by_patient(ctrate: Path) -> None:
    assert parse_volume_name("valid_12_b_3") == ("valid_12", "valid_12_b", 3)
    recs, summary = source_records(ctrate)  # the paper's protocol is source_records' default
    keys = {r.key: r for r in recs}
    assert "train_1_a_2" not in keys and "train_2_a_3" not in keys
    assert {"train_1_a_1", "train_1_b_1", "train_2_a_1"} <= set(keys)
    assert summary.dropped == {"duplicate_reconstruction": 2}
    assert summary.found == 15 and len(recs) == 13
    assert keys["train_1_a_1"].split == keys["train_1_b_1"].split
    assert (
        keys["valid_1_a_1"].extra["patient"] == "valid_1"
        and keys["train_1_a_1"].extra["patient"] == "train_1"
    )
    for r in recs:  # the split is a function of the patient id (and the seed) alone
        assert r.split == assign_split(r.extra["patient"], 0) and r.split in ("train", "valid", "test")
    again, _ = source_records(ctrate, split="patient", seed=7)
    assert [r.key for r in again] != [r.key for r in recs] or any(
        a.split != b.split for a, b in zip(again, recs)
    )
    official, summary = source_records(ctrate, split="official")
    assert {r.split for r in official} == {"train", "valid"} and summary.dropped == {
        "duplicate_reconstruction": 2
    }


def test_patient_split_fractions_seeded_and_order_free() -> None:
    patients = [f"{s}_{i}" for s in ("train", "valid") for i in range(1500)]
    a = {p: assign_split(p, 5) for p in patients}
    assert a == {p: assign_split(p, 5) for p in reversed(patients)}
    frac = {s: list(a.values()).count(s) / len(a) for s in ("train", "valid", "test")}
    assert (
        abs(frac["train"] - 0.7) < 0.03 and abs(frac["valid"] - 0.1) < 0.02 and abs(frac["test"] - 0.2) < 0.03
    )
    assert sum(a[p] != assign_split(p, 6) for p in patients) > 500  # another seed, another split


def test_paper_shards_list_splits_and_drops(ctrate: Path, tmp_path: Path) -> None:
    too_long = " ".join(["word"] * 600)
    _edit_rows(
        ctrate / "radiology_text_reports" / "train_reports.csv",
        lambda rows: [
            {**r, "Findings_EN": too_long} if r["VolumeName"] == "train_3_a_1.nii.gz" else r for r in rows
        ],
    )
    out = tmp_path / "sh"
    index = write_shards(ctrate, out, hr_size=(8, 16, 16), samples_per_shard=4, progress=False, **PAPER)
    s = index["summary"]
    assert s["dropped"] == {"duplicate_reconstruction": 2, "report_too_long": 1}
    assert s["found"] == 15 and s["written"] == 12 and s["unaccounted"] == 0
    assert any("report_too_long" in e and "[key train_3_a_1]" in e for e in s["errors"])
    assert index["preprocessing"]["split"] == "patient" and index["preprocessing"]["target_spacing"] == [
        48.0,
        24.0,
        24.0,
    ]
    shard_set = ShardSet(out)
    assert shard_set.splits == index["splits"] and sum(shard_set.splits.values()) == 12
    assert shard_set.has_split("train") and shard_set.has_split("test") == ("test" in index["splits"])
    split_of: dict[str, set[str]] = {}
    for i, sh in enumerate(shard_set.shards):
        for j in range(sh["count"]):
            meta = shard_set.read(i, j)["meta"]
            split_of.setdefault(meta["patient"], set()).add(meta["split"])
            assert meta["spacing"] == [48.0, 24.0, 24.0] and meta["official_split"] in ("train", "valid")
    assert all(len(v) == 1 for v in split_of.values())  # no patient in two splits
    assert verify_shards(out)["ok"]


def test_fov_resampling_pads_with_air_and_crops_large_volumes(tmp_path: Path) -> None:
    small = np.zeros((40, 64, 64), np.int16)  # 192 mm cube of 0 HU at 4.8 x 3 x 3 mm
    nib.Nifti1Image(small.T, np.diag([3.0, 3.0, 4.8, 1.0])).to_filename(tmp_path / "small.nii.gz")
    big = np.zeros((10, 16, 16), np.int16)  # 500 x 480 x 480 mm: larger than the field of view
    nib.Nifti1Image(big.T, np.diag([30.0, 30.0, 50.0, 1.0])).to_filename(tmp_path / "big.nii.gz")
    (tmp_path / "m.csv").write_text(
        f"path,report,id\nsmall.nii.gz,{REPORT},small\nbig.nii.gz,{REPORT} Big.,big\n"
    )
    out = tmp_path / "o"
    index = write_shards(tmp_path / "m.csv", out, hr_size=(16, 32, 32), fov_mm=384.0, progress=False)
    assert index["summary"]["flagged"] == {"low_coverage": 1} and index["summary"]["dropped"] == {}
    shard_set = ShardSet(out)
    s, b = shard_set.load("small"), shard_set.load("big")
    assert s["meta"]["spacing"] == [24.0, 12.0, 12.0] and s["meta"]["coverage"] == 0.125
    tissue = round(1000 * 255 / 1200)  # 0 HU in uint8
    want = np.zeros((16, 32, 32), np.uint8)  # air
    want[4:12, 8:24, 8:24] = tissue  # 192 mm = 8 x 24 mm, 16 x 12 mm, centred
    assert np.array_equal(s["hr"], want)
    assert (b["hr"] == tissue).all() and b["meta"]["coverage"] == 1.0
    stretched = write_shards(tmp_path / "m.csv", tmp_path / "st", hr_size=(16, 32, 32), progress=False)
    assert stretched["preprocessing"]["resample"] == "stretch"
    assert (ShardSet(tmp_path / "st").load("small")["hr"] == tissue).all()


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("ZSpacing", "0", "bad_spacing"),
        ("ZSpacing", "-1.5", "bad_spacing"),
        ("XYSpacing", "[nan, 0.75]", "bad_spacing"),
        ("RescaleSlope", "abc", "bad_metadata"),
    ],
)
def test_bad_metadata_names_csv_key_and_column(tmp_path: Path, column: str, value: str, reason: str) -> None:
    generate_phantom(tmp_path, n=4, size=(8, 16, 16), seed=0)
    meta = tmp_path / "metadata" / "train_metadata.csv"
    _edit_rows(
        meta,
        lambda rows: [{**r, column: value} if r["VolumeName"] == "train_2_a_1.nii.gz" else r for r in rows],
    )
    with pytest.raises(DataError, match=rf"{reason}: .*train_metadata.csv \[key train_2_a_1\]: {column}"):
        source_records(tmp_path)
    recs, summary = source_records(tmp_path, on_error="skip")
    assert len(recs) == 3 and summary.dropped == {reason: 1}


def test_real_scans_resampled_to_the_fov(tmp_path: Path) -> None:
    path = REAL / "thorax_crop_lps_int16_1.5mm.nii.gz"
    if not path.exists():
        pytest.skip(f"real CT test data absent: {path} (shared data directory not mounted)")
    from shards.ingest import Record

    hu, spacing = load_canonical(Record("t", path, REPORT, "train", "real"))
    size = (16, 32, 32)
    arr, out_spacing = preprocess(hu, spacing, size, target_spacing=fov_spacing(size))
    assert out_spacing == (24.0, 12.0, 12.0) and arr.shape == size
    extent = [max(1, round(n * s / t)) for n, s, t in zip(hu.shape, spacing, out_spacing)]
    inside = np.zeros(size, bool)
    inside[tuple(slice((m - e) // 2, (m - e) // 2 + e) for m, e in zip(size, extent))] = True
    assert (arr[~inside] == 0).all() and (arr[inside] > 0).mean() > 0.3  # air outside the scan, body inside
