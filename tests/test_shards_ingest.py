"""Ingestion: canonical orientation, dtype/orientation invariance on real CT, preprocessing, bad input."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shards.ingest import (
    DataError,
    Record,
    assign_split,
    load_canonical,
    manifest_records,
    preprocess,
    source_records,
)

REAL = Path(__file__).parents[2] / "shared" / "data" / "real_ct"
LONG_REPORT = "Trachea and both main bronchi are open. No pleural effusion was detected on either side."


def _real(name: str) -> Path:
    p = REAL / name
    if not p.exists():
        pytest.skip(f"real CT test data absent: {p} (shared data directory not mounted)")
    return p


def _rec(path: Path, key: str = "k") -> Record:
    return Record(key, path, LONG_REPORT, "train", "test")


def _resave(
    src: Path, dst: Path, flip: tuple[int, ...] = (), perm: tuple[int, int, int] = (0, 1, 2), dtype=None
) -> Path:
    """Store the same scan differently: flip/permute voxel axes (affine kept consistent), other dtype."""
    img = nib.load(src)
    data = np.asarray(img.dataobj)
    aff = img.affine.copy()
    for ax in flip:
        data = np.flip(data, ax)
        aff[:, 3] = aff[:, 3] + aff[:, ax] * (img.shape[ax] - 1)
        aff[:, ax] = -aff[:, ax]
    data = np.transpose(data, perm)
    aff[:, :3] = aff[:, list(perm)]
    out = nib.Nifti1Image(np.ascontiguousarray(data).astype(dtype or data.dtype), aff)
    out.to_filename(dst)
    return dst


@pytest.mark.parametrize("name", ["thorax_crop_lps_int16_1.5mm.nii.gz", "abdomen_ras_int32_3mm.nii.gz"])
def test_same_scan_other_orientation_or_dtype_gives_same_array(tmp_path: Path, name: str) -> None:
    src = _real(name)
    ref, ref_sp = load_canonical(_rec(src))
    ref_pre, _ = preprocess(ref, ref_sp, (24, 48, 48))
    variants = [
        _resave(src, tmp_path / "flip_xy_int32.nii.gz", flip=(0, 1), dtype=np.int32),
        _resave(src, tmp_path / "flip_z_float32.nii.gz", flip=(2,), dtype=np.float32),
        _resave(src, tmp_path / "perm_zxy_int16.nii.gz", perm=(2, 0, 1), dtype=np.int16),
    ]
    for v in variants:
        assert (
            nib.aff2axcodes(nib.load(v).affine) != nib.aff2axcodes(nib.load(src).affine)
            or "int16" not in v.name
        )
        arr, sp = load_canonical(_rec(v))
        assert sp == ref_sp and np.array_equal(arr, ref), v.name
        pre, _ = preprocess(arr, sp, (24, 48, 48))
        assert np.array_equal(pre, ref_pre), v.name


def test_real_scans_share_one_orientation() -> None:
    """Both real scans (LPS and RAS on disk) come out head first (D), front first (H), right first (W)."""
    thorax, sp_t = load_canonical(_rec(_real("thorax_crop_lps_int16_1.5mm.nii.gz")))
    abdomen, sp_a = load_canonical(_rec(_real("abdomen_ras_int32_3mm.nii.gz")))
    assert sp_t == (1.5, 1.5, 1.5) and sp_a == (3.0, 3.0, 3.0)
    d = thorax.shape[0]
    # Thorax: more lung (air) in the upper quarter than above the diaphragm at the bottom.
    assert (thorax[: d // 4] < -500).mean() > 2 * (thorax[-d // 4 :] < -500).mean()
    d, h, w = abdomen.shape
    # Abdomen: the spine (bone > 250 HU) lies posterior (high H) ...
    assert (abdomen[:, h // 2 :] > 250).mean() > 4 * (abdomen[:, : h // 2] > 250).mean()
    # ... and the liver (soft tissue, upper quarter) on the patient's right (low W).
    soft = (abdomen[: d // 4] > 20) & (abdomen[: d // 4] < 90)
    assert soft[:, :, : w // 2].mean() > 1.15 * soft[:, :, w // 2 :].mean()


def test_canonical_axes_point_inferior_posterior_left(tmp_path: Path) -> None:
    """A marker at the most right-anterior-superior voxel ends at arr[0, 0, 0]."""
    data = np.zeros((5, 6, 7), dtype=np.int16)  # stored LAS-ish: i -> L, j -> A, k -> I
    aff = np.diag([1.0, 2.0, -3.0, 1.0])
    aff[0, 0] = -1.0
    # World RAS of voxel (i, j, k) = (-i, 2j, -3k): the most R-A-S voxel is i=0, j=5, k=0.
    data[0, 5, 0] = 100
    nib.Nifti1Image(data, aff).to_filename(tmp_path / "m.nii.gz")
    arr, spacing = load_canonical(_rec(tmp_path / "m.nii.gz"))
    assert arr.shape == (7, 6, 5) and spacing == (3.0, 2.0, 1.0)
    assert arr[0, 0, 0] == 100 and arr.sum() == 100


def test_preprocess_window_scaling_and_spacing() -> None:
    hu = np.full((4, 4, 4), -400.0, dtype=np.float32)
    hu[0, 0, 0], hu[0, 0, 1], hu[0, 0, 2] = -3000.0, 200.0, 3000.0
    u8, sp = preprocess(hu, (2.0, 1.0, 1.0), (4, 4, 4), "uint8")
    assert u8.dtype == np.uint8 and sp == (2.0, 1.0, 1.0)
    assert (u8[0, 0, 0], u8[0, 0, 1], u8[0, 0, 2], u8[1, 1, 1]) == (
        0,
        255,
        255,
        128,
    )  # -400 HU -> 127.5 -> 128
    i16, _ = preprocess(hu, (2.0, 1.0, 1.0), (4, 4, 4), "int16")  # HU, clipped to the scanner's range
    assert (i16[0, 0, 0], i16[0, 0, 1], i16[0, 0, 2], i16[1, 1, 1]) == (-1024, 200, 3000, -400)
    # Resize to half: spacing doubles. Target spacing: resample, then centre crop/pad with air.
    _, sp2 = preprocess(hu, (2.0, 1.0, 1.0), (2, 2, 2))
    assert sp2 == (4.0, 2.0, 2.0)
    padded, sp3 = preprocess(
        np.zeros((4, 4, 4), np.float32), (1.0, 1.0, 1.0), (6, 2, 2), "int16", target_spacing=(1.0, 1.0, 1.0)
    )
    assert sp3 == (1.0, 1.0, 1.0) and padded.shape == (6, 2, 2)
    assert (padded[0] == -1000).all() and (padded[1:5] == 0).all() and (padded[5] == -1000).all()


def _manifest(tmp_path: Path, rows: list[dict]) -> Path:
    p = tmp_path / "manifest.csv"
    with open(p, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "report", "split", "id"])
        w.writeheader()
        w.writerows(rows)
    return p


def _vol(tmp_path: Path, name: str, data=None, zooms=(1.0, 1.0, 1.0)) -> str:
    data = np.zeros((6, 6, 6), np.int16) if data is None else data
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    img.to_filename(tmp_path / name)
    return name


def test_manifest_bad_inputs_raise_naming_file_and_key_or_are_counted(tmp_path: Path) -> None:
    good = _vol(tmp_path, "good.nii.gz")
    rows = [
        {"path": good, "report": LONG_REPORT, "split": "train", "id": "a"},
        {"path": "nowhere.nii.gz", "report": LONG_REPORT, "split": "train", "id": "lost"},
        {"path": good, "report": "   ", "split": "train", "id": "empty"},
        {"path": good, "report": LONG_REPORT + " Again.", "split": "valid", "id": "a"},
        {"path": good, "report": "Too short.", "split": "train", "id": "short"},
        {"path": good, "report": LONG_REPORT, "split": "train", "id": "dupe_text"},
    ]
    m = _manifest(tmp_path, rows)
    with pytest.raises(DataError, match=r"missing_file: .*manifest.csv \[key lost\]"):
        manifest_records(m)
    recs, summary = source_records(m, on_error="skip")
    assert [r.key for r in recs] == ["a"]
    assert summary.dropped == {
        "missing_file": 1,
        "empty_report": 1,
        "duplicate_key": 1,
        "report_too_short": 1,
        "duplicate_report": 1,
    }
    with pytest.raises(DataError, match=r"duplicate_key: .*good.nii.gz \[key a\]"):
        source_records(_manifest(tmp_path, [r for r in rows if r["id"] not in ("lost", "empty")]))
    with pytest.raises(DataError, match=r"empty_report: .*good.nii.gz \[key empty\]"):
        source_records(_manifest(tmp_path, [r for r in rows if r["id"] != "lost"]))


@pytest.mark.parametrize(
    ("data", "zooms", "reason"),
    [
        (np.zeros((6, 6), np.int16), (1.0, 1.0), "not_3d"),
        (np.zeros((6, 6, 6), np.int16), (1.0, 0.0, 1.0), "bad_spacing"),
        (
            np.where(np.eye(6, dtype=bool)[None], np.nan, 0.0).repeat(6, 0).astype(np.float32),
            (1.0, 1.0, 1.0),
            "non_finite",
        ),
        (np.full((6, 6, 6), np.inf, np.float32), (1.0, 1.0, 1.0), "non_finite"),
    ],
)
def test_bad_nifti_raises_naming_file_and_key(tmp_path: Path, data, zooms, reason: str) -> None:
    path = tmp_path / "bad.nii"
    nib.Nifti1Image(data, np.eye(4)).to_filename(path)
    raw = bytearray(path.read_bytes())
    # pixdim[1:] at byte 80: a zero spacing is a broken header, as found in the wild.
    raw[80 : 80 + 4 * len(zooms)] = np.asarray(zooms, "<f4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{reason}: .*bad.nii \[key badkey\]"):
        load_canonical(_rec(path, "badkey"))


def test_split_is_deterministic_70_10_20() -> None:
    keys = [f"vol_{i}" for i in range(3000)]
    a = [assign_split(k) for k in keys]
    assert a == [assign_split(k) for k in keys]
    frac = {s: a.count(s) / len(a) for s in ("train", "valid", "test")}
    assert (
        abs(frac["train"] - 0.7) < 0.03 and abs(frac["valid"] - 0.1) < 0.02 and abs(frac["test"] - 0.2) < 0.03
    )


def test_ct_rate_missing_report_and_slope_intercept(tmp_path: Path) -> None:
    from shards.phantom import generate_phantom, volume_path

    generate_phantom(tmp_path, n=4, size=(8, 16, 16), seed=0)
    recs, _ = source_records(tmp_path)
    assert len(recs) == 4 and all(r.slope == 1.0 and r.intercept == -1024.0 for r in recs)
    hu, _ = load_canonical(recs[0])
    assert hu.min() < -900  # air: stored 0..~30 + intercept -1024
    # A volume whose report row is missing: raise naming the reports CSV and the key, or skip it.
    extra = volume_path(tmp_path, "train_99_a_1.nii.gz")
    extra.parent.mkdir(parents=True)
    extra.write_bytes(volume_path(tmp_path, "train_1_a_1.nii.gz").read_bytes())
    with pytest.raises(DataError, match=r"missing_report: .*train_reports.csv \[key train_99_a_1\]"):
        source_records(tmp_path)
    recs, summary = source_records(tmp_path, on_error="skip")
    assert len(recs) == 4 and summary.dropped == {"missing_report": 1}


def test_ct_rate_validation_csv_names(tmp_path: Path) -> None:
    """CT-RATE names its CSVs validation_reports/validation_metadata but its volumes valid/valid_*."""
    from shards.phantom import generate_phantom

    generate_phantom(tmp_path, n=5, size=(8, 16, 16), seed=1)
    for folder, old, new in [
        ("radiology_text_reports", "valid_reports.csv", "validation_reports.csv"),
        ("metadata", "valid_metadata.csv", "validation_metadata.csv"),
    ]:
        (tmp_path / folder / old).rename(tmp_path / folder / new)
    meta = tmp_path / "metadata" / "validation_metadata.csv"
    text = meta.read_text()
    assert '"[22.5, 22.5]"' in text
    meta.write_text(text.replace('"[22.5, 22.5]"', "(22.5 22.5)"))  # another spacing spelling
    recs, summary = source_records(tmp_path, split="official")
    valid = [r for r in recs if r.split == "valid"]
    assert len(recs) == 5 and len(valid) == 1 and summary.dropped == {}
    assert valid[0].labels is not None and valid[0].slope == 1.0 and valid[0].spacing == (37.5, 22.5, 22.5)
