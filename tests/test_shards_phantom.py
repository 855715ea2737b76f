"""Phantom generator: CT-RATE layout, determinism, findings consistent with volume and report."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shards.ingest import Record, load_canonical
from shards.phantom import HR_ONLY_FILL, PHANTOM_CLASSES, Grid, generate_phantom, make_volume, volume_path
from shards.phantom_report import HR_ONLY_KINDS, KINDS, LR_VISIBLE_KINDS, read_findings
from shards.schema import CLASSES

SIZE = (32, 64, 64)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, n=12, size=SIZE, seed=3, prevalence=0.5)
    return out


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_layout_and_columns(phantom: Path) -> None:
    for split in ("train", "valid"):
        reports = _rows(phantom / "radiology_text_reports" / f"{split}_reports.csv")
        meta = _rows(phantom / "metadata" / f"{split}_metadata.csv")
        labels = _rows(phantom / "multi_abnormality_labels" / f"{split}_predicted_labels.csv")
        assert reports and len(reports) == len(meta) == len(labels)
        assert set(reports[0]) == {
            "VolumeName",
            "ClinicalInformation_EN",
            "Technique_EN",
            "Findings_EN",
            "Impressions_EN",
        }
        assert {"VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing", "Findings"} <= set(
            meta[0]
        )
        assert list(labels[0]) == ["VolumeName", *CLASSES]
        for r in reports:
            name = r["VolumeName"]
            assert name.startswith(f"{split}_") and name.endswith("_a_1.nii.gz")
            p = volume_path(phantom, name)
            assert p.exists(), p
            img = nib.load(p)
            assert img.get_data_dtype() == np.int16 and img.shape == (SIZE[2], SIZE[1], SIZE[0])


def test_deterministic_for_a_seed() -> None:
    a, sa, fa = make_volume(SIZE, seed=5, index=2)
    b, sb, fb = make_volume(SIZE, seed=5, index=2)
    c, _, _ = make_volume(SIZE, seed=6, index=2)
    assert np.array_equal(a, b) and sa == sb and fa == fb
    assert not np.array_equal(a, c)


def test_hu_values_are_realistic() -> None:
    hu, _, _ = make_volume((32, 64, 64), seed=0, index=0, prevalence=0.0)
    d, h, w = hu.shape
    # Canonical (S->I, A->P, R->L): centre of the right lung is air-like, the spine is bone.
    assert hu[d // 3, h // 2, w // 5 + 4] < -700
    assert hu[:, int(h * (75 + 180) / 360), w // 2].mean() > 200
    assert hu[0, 0, 0] < -900  # outside the body
    assert 5 < np.std(hu[0:4, 0:4, 0:4]) < 25  # noise of about 12 HU


def test_findings_match_volume_labels_and_report(phantom: Path) -> None:
    meta = {
        r["VolumeName"]: r
        for s in ("train", "valid")
        for r in _rows(phantom / "metadata" / f"{s}_metadata.csv")
    }
    labels = {
        r["VolumeName"]: r
        for s in ("train", "valid")
        for r in _rows(phantom / "multi_abnormality_labels" / f"{s}_predicted_labels.csv")
    }
    reports = {
        r["VolumeName"]: r
        for s in ("train", "valid")
        for r in _rows(phantom / "radiology_text_reports" / f"{s}_reports.csv")
    }
    seen = set()
    for name, m in meta.items():
        findings = json.loads(m["Findings"])
        present = {f["class"] for f in findings}
        seen |= present
        for c in CLASSES:
            assert int(labels[name][c]) == int(c in present), (name, c)
        text = reports[name]["Findings_EN"]
        hu, spacing = load_canonical(
            Record(name, volume_path(phantom, name), "", "train", "ct-rate", 1.0, -1024.0)
        )
        grid = Grid(SIZE)
        for f in findings:
            if f["class"] == "Lung nodule":
                x, y, z = f["center_mm"]
                idx = (np.argmin(abs(grid.z - z)), np.argmin(abs(grid.y - y)), np.argmin(abs(grid.x - x)))
                assert hu[idx] > -300, (name, f, hu[idx])  # solid nodule at its stated place
                assert f["side"] == ("right" if x < 0 else "left")  # canonical W runs right -> left
                assert f"{f['side']} lung" in text and f["lobe"] in text
            if f["class"] == "Pleural effusion":
                assert f"{f['size_mm']} mm" in text and f["side"] in text
        if "Lung nodule" not in present:
            assert "No nodul" in text
        if "Pleural effusion" not in present:
            assert "effusion was not" in text or "No pleural effusion" in text
        if "Emphysema" in present:
            assert "emphysematous" in text.lower()
        if "Cardiomegaly" in present:
            assert "cardiomegaly" in text.lower()
    assert len(seen) >= 8, seen


def test_effusion_side_and_cardiomegaly_visible() -> None:
    """The stated side holds fluid at the lung's back; an enlarged heart fills more voxels."""
    for i in range(40):
        hu, _, findings = make_volume(SIZE, seed=1, index=i, prevalence=0.5)
        eff = {f["side"] for f in findings if f["class"] == "Pleural effusion"}
        if len(eff) == 1:
            side = next(iter(eff))
            d, h, w = hu.shape
            fluid = (hu > -100) & (hu < 100)
            right, left = (
                fluid[d // 4 : 3 * d // 4, h // 2 :, : w // 3].sum(),
                fluid[d // 4 : 3 * d // 4, h // 2 :, 2 * w // 3 :].sum(),
            )
            assert (right > left) == (side == "right"), (i, side, right, left)
            break
    else:
        pytest.fail("no one-sided effusion drawn in 40 volumes")
    # Heart-level slab in front of the spine (z 130-220 mm, y -80..20 mm, x -100..100 mm): an
    # enlarged heart replaces lung there. Same seed and index, with and without cardiomegaly.
    grid = Grid(SIZE)
    zs, ys, xs = (
        (a >= lo) & (a <= hi) for a, lo, hi in ((grid.z, 130, 220), (grid.y, -80, 20), (grid.x, -100, 100))
    )

    def soft(classes: set) -> int:
        v = make_volume(SIZE, seed=2, index=0, classes=classes)[0][np.ix_(zs, ys, xs)]
        return int(((v > 0) & (v < 100)).sum())

    assert soft({"Cardiomegaly"}) > 1.3 * soft(set())


def test_small_nodules_vanish_after_4x_downsampling() -> None:
    size = (64, 128, 128)
    checked = 0
    for i in range(30):
        hu, spacing, findings = make_volume(size, seed=7, index=i, prevalence=0.4)
        grid = Grid(size)
        for f in findings:
            if f["class"] != "Lung nodule" or f["size_mm"] > 3 * spacing[2]:
                continue
            x, y, z = f["center_mm"]
            iz, iy, ix = (int(np.argmin(abs(a - v))) for a, v in ((grid.z, z), (grid.y, y), (grid.x, x)))
            win = np.clip(hu.astype(np.float32), -1000, 200)
            hr_contrast = win[iz, iy, ix] - np.median(
                win[max(0, iz - 4) : iz + 5, max(0, iy - 8) : iy + 9, max(0, ix - 8) : ix + 9]
            )
            # 4x average pool around the nodule: its contrast drops by most of the HR contrast.
            z0, y0, x0 = (iz // 4) * 4, (iy // 4) * 4, (ix // 4) * 4
            lr = win[z0 : z0 + 4, y0 : y0 + 4, x0 : x0 + 4].mean() - np.median(
                win[max(0, z0 - 8) : z0 + 12, max(0, y0 - 8) : y0 + 12, max(0, x0 - 8) : x0 + 12]
            )
            assert hr_contrast > 600, (i, f, hr_contrast)
            assert lr < 0.35 * hr_contrast, (i, f, lr, hr_contrast)
            checked += 1
    assert checked >= 2


def test_calcium_stands_out_at_hr_in_hu_and_not_after_2x_downsampling() -> None:
    """The brightest tissue of a volume is bone at 350 HU; a calcification is one HR voxel of 800
    HU: the HR volume's maximum tells whether a volume has one (above the paper's 200 HU window
    top, which is why the window alone cannot), the 2x average-pooled volume's does not."""
    size = (32, 64, 64)
    seen = {True: 0, False: 0}
    for i in range(8):
        calcified = i % 2 == 0
        classes = {"Arterial wall calcification"} if calcified else {"Cardiomegaly"}
        hu, _, findings = make_volume(size, seed=11, index=i, classes=classes)
        lr = hu.astype(np.float32).reshape(16, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
        if calcified:
            assert hu.max() >= 700, (i, hu.max())
        else:
            assert hu.max() < 450, (i, hu.max())
        assert lr.max() < 450, (i, lr.max())
        seen[calcified] += 1
    assert seen == {True: 4, False: 4}


def test_int16_shards_keep_the_hu_of_calcifications(phantom: Path, tmp_path: Path) -> None:
    """int16 shards store HU (clipped to the scanner's range only), so a calcification's HU above
    the paper's window reaches the model (the calcium channel, a wider vision.hu_window); uint8
    shards are the window. The phantom is written at its own size: no resampling."""
    from shards.read import ShardSet
    from shards.write import write_shards

    write_shards(phantom, tmp_path / "i16", hr_size=SIZE, dtype="int16", progress=False)
    write_shards(phantom, tmp_path / "u8", hr_size=SIZE, progress=False)
    i16, u8 = ShardSet(tmp_path / "i16"), ShardSet(tmp_path / "u8")
    calcified = 0
    for split in ("train", "valid"):
        for (i, j), (k, m) in zip(i16.entries(split), u8.entries(split)):
            a, b = i16.read(i, j), u8.read(k, m)
            name = a["meta"]["source"]
            hu, _ = load_canonical(Record(a["key"], Path(name), "", split, "ct-rate", 1.0, -1024.0))
            assert np.array_equal(np.asarray(a["hr"]), hu.astype(np.int16)), name
            expected = np.rint((np.clip(hu, -1000, 200) + 1000) * 255 / 1200).astype(np.uint8)
            assert np.array_equal(np.asarray(b["hr"]), expected), name
            classes = {f["class"] for f in a["meta"]["findings"]}
            if classes & {"Arterial wall calcification", "Coronary artery wall calcification"}:
                calcified += 1
                assert np.asarray(a["hr"]).max() >= 700 and np.asarray(b["hr"]).max() == 255, name
    assert calcified > 0


def test_reports_match_labeler_when_available(phantom: Path) -> None:
    labeler = pytest.importorskip("hilt_scale.evaluation.labeler")
    rows = [
        r for s in ("train", "valid") for r in _rows(phantom / "radiology_text_reports" / f"{s}_reports.csv")
    ]
    labels = {
        r["VolumeName"]: r
        for s in ("train", "valid")
        for r in _rows(phantom / "multi_abnormality_labels" / f"{s}_predicted_labels.csv")
    }
    wrong = []
    for r in rows:
        got = labeler.label_report(r["Findings_EN"])
        for c in PHANTOM_CLASSES:
            if int(got.get(c, 0)) != int(labels[r["VolumeName"]][c]):
                wrong.append((r["VolumeName"], c))
    assert not wrong, wrong[:10]


@pytest.mark.slow
def test_workers_do_not_change_the_output(tmp_path: Path) -> None:
    generate_phantom(tmp_path / "one", n=4, size=(8, 16, 16), seed=9, workers=1)
    generate_phantom(tmp_path / "two", n=4, size=(8, 16, 16), seed=9, workers=2)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 4 + 6
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_hr_only_and_lr_visible_groups_hold_by_physics() -> None:
    """At the main job's size every finding's LR fill puts it in its kind's group, and both
    groups occur often enough to be scored."""
    seen = {"hr-only": 0, "lr-visible": 0}
    for i in range(40):
        _, _, findings = make_volume(SIZE, seed=0, index=i)
        for f in findings:
            hr_only = f["kind"] in HR_ONLY_KINDS
            assert (f["lr_fill"] < HR_ONLY_FILL) == hr_only, (i, f)
            assert f["visibility"] == ("hr-only" if hr_only else "lr-visible")
            seen[f["visibility"]] += 1
    assert seen["hr-only"] >= 20 and seen["lr-visible"] >= 40, seen
    assert set(KINDS) == set(HR_ONLY_KINDS) | set(LR_VISIBLE_KINDS)


def test_small_nodule_is_one_voxel_and_large_fills_an_lr_voxel() -> None:
    _, _, small = make_volume(SIZE, seed=4, index=0, classes={"small nodule"})
    _, _, large = make_volume(SIZE, seed=4, index=0, classes={"large nodule"})
    assert {f["kind"] for f in small} == {"small nodule"}
    assert all(f["lr_fill"] == 0.125 for f in small)  # one voxel of a 2x2x2 LR block
    assert {f["kind"] for f in large} == {"large nodule"}
    assert all(f["lr_fill"] >= 0.5 for f in large)


def test_read_findings_recovers_the_kinds_from_every_report(phantom: Path) -> None:
    meta = {
        r["VolumeName"]: json.loads(r["Findings"])
        for s in ("train", "valid")
        for r in _rows(phantom / "metadata" / f"{s}_metadata.csv")
    }
    for s in ("train", "valid"):
        for r in _rows(phantom / "radiology_text_reports" / f"{s}_reports.csv"):
            assert read_findings(r["Findings_EN"]) == {f["kind"] for f in meta[r["VolumeName"]]}
    assert read_findings("No nodule or mass was detected in either lung.") == set()
    assert read_findings("There is a millimetric nodule of 4 mm in the left lung upper lobe.") == {
        "small nodule"
    }
    assert read_findings("There is a 2.5 mm nodule in the left lung upper lobe.") == {"large nodule"}
