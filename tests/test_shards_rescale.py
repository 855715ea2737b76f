"""CT-RATE v1 (raw values + the CSV rescale) and v2 (HU stored, the CSV still saying -1024) give one array."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shards.ingest import DataError, Record, load_canonical
from shards.phantom import generate_phantom, volume_path
from shards.read import ShardSet
from shards.write import write_shards


def _hu_volume(shape=(12, 24, 24), seed=0) -> np.ndarray:
    """A small chest-like HU array (W, H, D as NIfTI stores it): air, a body, lungs, a bone."""
    rng = np.random.default_rng(seed)
    w, h, d = shape[2], shape[1], shape[0]
    hu = np.full((w, h, d), -1000.0) + rng.normal(0, 10, (w, h, d))
    hu[4:-4, 4:-4, :] = 40 + rng.normal(0, 10, (w - 8, h - 8, d))  # soft tissue
    hu[6:11, 7:-7, 2:-2] = -850  # lungs
    hu[14:19, 7:-7, 2:-2] = -850
    hu[11:13, 12:14, :] = 700  # a bone
    return np.rint(hu)


def _save(path: Path, stored: np.ndarray, slope=None, inter=None) -> Path:
    img = nib.Nifti1Image(stored.astype(np.int16), np.diag([-1.0, -1.0, 2.0, 1.0]))
    img.header.set_slope_inter(slope, inter)  # None: no scaling in the header (CT-RATE v1 and v2)
    nib.save(img, path)
    return path


def _rec(path: Path, key: str) -> Record:
    return Record(key, path, "report", "train", "ct-rate", slope=1.0, intercept=-1024.0)


def test_v1_and_v2_give_the_same_array(tmp_path: Path) -> None:
    hu = _hu_volume()
    v1 = _save(tmp_path / "v1.nii.gz", hu + 1024)  # raw stored values; the CSV's -1024 makes them HU
    v2 = _save(tmp_path / "v2.nii.gz", hu)  # already HU; the CSV still lists -1024
    r1, r2 = _rec(v1, "v1"), _rec(v2, "v2")
    a1, sp1 = load_canonical(r1)
    a2, sp2 = load_canonical(r2)
    assert r1.extra["rescale"] == "csv" and r2.extra["rescale"] == "header"
    np.testing.assert_array_equal(a1, a2)
    assert sp1 == sp2
    assert a1.min() == hu.min() and a1.max() == hu.max()  # HU, not shifted by -1024


def test_a_header_that_scales_itself_is_read_by_its_header(tmp_path: Path) -> None:
    hu = _hu_volume(seed=1)
    path = _save(tmp_path / "h.nii.gz", hu + 1024, slope=1.0, inter=-1024.0)
    rec = _rec(path, "h")
    arr, _ = load_canonical(rec)
    assert rec.extra["rescale"] == "header"
    assert arr.min() == hu.min() and arr.max() == hu.max()


@pytest.mark.parametrize(
    ("stored_shift", "forced", "seen"),
    [(0, "csv", "csv: air -20"), (1024, "header", "header: air ")],  # v2 forced to csv; v1 forced to header
)
def test_a_wrong_forced_choice_is_refused_naming_file_and_values(
    tmp_path, stored_shift, forced, seen
) -> None:
    path = _save(tmp_path / "x.nii.gz", _hu_volume() + stored_shift)
    with pytest.raises(
        DataError, match=r"implausible_hu: .*x\.nii\.gz \[key x\]: --rescale " + forced
    ) as info:
        load_canonical(_rec(path, "x"), forced)
    assert seen in str(info.value) and "CT-RATE v1 stores raw values" in str(info.value)


def test_constant_padding_outside_the_scan_circle_does_not_decide(tmp_path: Path) -> None:
    """v1 files often store -2000 (raw) outside the reconstruction circle: air must not be read there."""
    raw = _hu_volume() + 1024
    raw[:3, :3, :] = -2000  # the corners outside the circle
    rec = _rec(_save(tmp_path / "p.nii.gz", raw), "p")
    load_canonical(rec)
    assert rec.extra["rescale"] == "csv"


def test_the_writer_counts_the_choice_per_shard_set(tmp_path: Path) -> None:
    """A CT-RATE tree mixing v1 files (raw stored, no header scaling) and v2 files (HU stored): each
    is read right, each choice counted; a forced choice drops exactly the files it does not fit."""
    root = tmp_path / "ct"
    generate_phantom(root, n=6, size=(8, 16, 16), seed=5)
    write_shards(root, tmp_path / "ref", hr_size=(8, 16, 16), progress=False)
    for name, shift in (("train_1_a_1", 0), ("train_2_a_1", 0), ("train_3_a_1", 1024)):
        path = volume_path(root, f"{name}.nii.gz")
        img = nib.load(path)
        out = nib.Nifti1Image(np.rint(img.get_fdata() + shift).astype(np.int16), img.affine)
        out.header.set_slope_inter(None, None)  # v2 (shift 0) or v1 (raw = HU + 1024) as CT-RATE has them
        nib.save(out, path)
    index = write_shards(root, tmp_path / "mixed", hr_size=(8, 16, 16), progress=False)
    # the untouched phantom files carry their scaling in the header; the v1 one needs the CSV
    assert index["summary"]["rescale"] == {"csv": 1, "header": 5}
    assert index["preprocessing"]["rescale"] == "auto"
    ref_set, mixed = ShardSet(tmp_path / "ref"), ShardSet(tmp_path / "mixed")
    assert ref_set.keys() == mixed.keys()
    assert all(np.array_equal(ref_set.load(k)["hr"], mixed.load(k)["hr"]) for k in ref_set.keys())
    forced = write_shards(
        root, tmp_path / "forced", hr_size=(8, 16, 16), progress=False, rescale="csv", on_error="skip"
    )
    assert forced["summary"]["dropped"] == {"implausible_hu": 2} and forced["summary"]["rescale"] == {
        "csv": 4
    }
