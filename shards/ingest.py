"""Sources (CT-RATE layout, manifest CSV, plain NIfTI) -> records -> canonical preprocessed arrays.

Canonical array orientation (docs/DATA.md): C-order (D, H, W) where index increases
D: superior -> inferior, H: anterior -> posterior, W: patient right -> patient left.
So `arr[d]` is an axial slice seen from the feet with anterior up and the patient's right on
the image's left: the radiological display convention. Preprocessing follows the paper (A.4):
HU clip to [-1000, 200], trilinear resample, and uint8 = the window scaled to [0, 255].
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel import orientations

from shards.schema import HU_WINDOW

# nibabel axis codes of the canonical (W, H, D) = NIfTI (i, j, k) order: +i -> L, +j -> P, +k -> I.
CANONICAL_AXCODES = ("L", "P", "I")
ORIENTATION = ("superior->inferior", "anterior->posterior", "right->left")
DTYPES = {"uint8": np.uint8, "int16": np.int16}
SPLIT_FRACTIONS = (("train", 0.7), ("valid", 0.1), ("test", 0.2))
MIN_TOKENS, MAX_TOKENS = 10, 512
CT_RATE_SPLIT_ALIASES = {"validation": "valid"}  # reports/metadata CSV prefix -> volume folder


class DataError(ValueError):
    """A bad input sample: the message names the file and the key."""

    def __init__(self, reason: str, file: str | Path = "", key: str = "", detail: str = "") -> None:
        self.reason, self.file, self.key, self.detail = reason, str(file), key, detail
        if not (file or key or detail):  # rebuilt from a message alone (DataLoader worker re-raise)
            self.reason = reason.split(":", 1)[0]
            super().__init__(reason)
            return
        super().__init__(f"{reason}: {file} [key {key}]: {detail}")

    def __reduce__(self):
        return (DataError, (self.reason, self.file, self.key, self.detail))


@dataclass
class Record:
    """One volume to ingest: where it is, its report, and what the source says about it."""

    key: str
    path: Path
    report: str
    split: str
    dataset: str
    slope: float | None = None  # CT-RATE: raw stored value * slope + intercept = HU
    intercept: float | None = None
    spacing: tuple[float, float, float] | None = None  # (z, y, x) mm, overrides the header
    labels: dict[str, int] | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Summary:
    """Counts of what a source or writer kept and dropped, by reason; errors under policy 'skip'."""

    found: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def drop(self, reason: str, message: str | None = None) -> None:
        self.dropped[reason] += 1
        if message and len(self.errors) < 50:
            self.errors.append(message)

    def as_dict(self) -> dict:
        return {
            "found": self.found,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "errors": self.errors,
        }


def check_policy(on_error: str) -> None:
    """Reject unknown error policies early, with the allowed values."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def handle(err: DataError, on_error: str, summary: Summary) -> None:
    """Raise the error (policy 'raise') or count it by reason (policy 'skip')."""
    if on_error == "raise":
        raise err
    summary.drop(err.reason, str(err))


# ---- Reading one volume into the canonical orientation. ----


def load_canonical(rec: Record) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Load a NIfTI as float32 HU in canonical (D, H, W) order, with its (z, y, x) spacing in mm."""
    try:
        img = nib.load(str(rec.path))
    except FileNotFoundError as e:
        raise DataError("missing_file", rec.path, rec.key, "file does not exist") from e
    except Exception as e:  # nibabel raises many types for corrupt files
        raise DataError("unreadable_nifti", rec.path, rec.key, f"{type(e).__name__}: {e}") from e
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 2:
        raise DataError("not_3d", rec.path, rec.key, f"expected a 3D volume, got shape {img.shape}")
    try:
        if rec.slope is not None:  # CT-RATE: the metadata CSV, not the header, gives the rescale
            data = np.asarray(img.dataobj.get_unscaled(), dtype=np.float32).reshape(shape)
            data = data * np.float32(rec.slope) + np.float32(rec.intercept or 0.0)
        else:
            data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as e:
        raise DataError("unreadable_nifti", rec.path, rec.key, f"{type(e).__name__}: {e}") from e
    if not np.isfinite(data).all():
        raise DataError("non_finite", rec.path, rec.key, f"{int((~np.isfinite(data)).sum())} NaN/Inf voxels")
    start = orientations.io_orientation(img.affine)
    if np.isnan(start).any():
        raise DataError("bad_affine", rec.path, rec.key, f"affine has no orientation:\n{img.affine}")
    transform = orientations.ornt_transform(start, orientations.axcodes2ornt(CANONICAL_AXCODES))
    data = orientations.apply_orientation(data, transform)  # now (W, H, D) in canonical directions
    zooms = _raw_zooms(img, rec)
    out_zooms = [0.0, 0.0, 0.0]
    for i, (axis, _flip) in enumerate(transform):
        out_zooms[int(axis)] = zooms[i]
    spacing = rec.spacing or (out_zooms[2], out_zooms[1], out_zooms[0])
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError("bad_spacing", rec.path, rec.key, f"spacing (z, y, x) = {spacing} mm must be > 0")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), tuple(float(s) for s in spacing)


def _raw_zooms(img, rec: Record) -> list[float]:
    """Voxel sizes as stored: nibabel silently turns a zero pixdim into 1, which would hide a broken file."""
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    try:
        with nib.openers.ImageOpener(str(rec.path)) as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
        zooms = [float(z) for z in raw.get_zooms()[:3]]
    except Exception:  # not a format with a raw header to reread: keep nibabel's view
        pass
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise DataError("bad_spacing", rec.path, rec.key, f"voxel size {zooms} mm must be > 0")
    return zooms


def preprocess(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    hr_size: tuple[int, int, int],
    dtype: str = "uint8",
    target_spacing: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Clip HU, resample (trilinear) to hr_size, quantise; return (array, output spacing z,y,x).

    With target_spacing the volume is first resampled to that spacing, then centre-cropped or
    padded with air to hr_size (CT-RATE's recipe); without it, it is resized straight to hr_size.
    """
    lo, hi = HU_WINDOW
    x = torch.from_numpy(np.clip(hu, lo, hi).astype(np.float32, copy=False))
    if target_spacing is not None:
        shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(x.shape, spacing, target_spacing))
        x = _resize(x, shape)
        x = _crop_or_pad(x, hr_size, lo)
        out_spacing = tuple(float(t) for t in target_spacing)
    else:
        out_spacing = tuple(float(s * n / m) for s, n, m in zip(spacing, x.shape, hr_size))
        x = _resize(x, hr_size)
    arr = x.numpy()
    if dtype == "uint8":
        arr = np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    elif dtype == "int16":
        arr = np.rint(arr).astype(np.int16)
    else:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return np.ascontiguousarray(arr), out_spacing


def _resize(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Trilinear resize of a 3D tensor (identity when the shape already matches)."""
    if tuple(x.shape) == tuple(shape):
        return x
    y = torch.nn.functional.interpolate(
        x[None, None], size=tuple(shape), mode="trilinear", align_corners=False
    )
    return y[0, 0]


def _crop_or_pad(x: torch.Tensor, shape: tuple[int, int, int], fill: float) -> torch.Tensor:
    """Centre-crop or pad (with fill) each axis to the target shape."""
    out = torch.full(tuple(shape), fill, dtype=x.dtype)
    src, dst = [], []
    for n, m in zip(x.shape, shape):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m))
            dst.append(slice(0, m))
        else:
            a = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = x[tuple(src)]
    return out


def array_sha256(arr: np.ndarray) -> str:
    """sha256 of an array's C-order bytes: the checksum stored per sample."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


# ---- Sources -> records. ----


def count_tokens(text: str) -> int:
    """Words and punctuation marks: a tokenizer-free stand-in for the paper's token length filter."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def assign_split(key: str) -> str:
    """Deterministic 70/10/20 train/valid/test split from a hash of the key."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
    acc = 0.0
    for name, frac in SPLIT_FRACTIONS:
        acc += frac
        if u < acc:
            return name
    return SPLIT_FRACTIONS[-1][0]


def safe_key(text: str) -> str:
    """A webdataset-safe key: no dots or slashes (webdataset splits member names at the first dot)."""
    return re.sub(r"[^\w-]", "_", text)


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict]:
    """Read a CSV into dicts, failing with the file and the missing column names."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError("bad_csv", path, "-", f"missing column(s) {missing}; has {reader.fieldnames}")
        return list(reader)


def _parse_spacing(xy: str, z: str, path: Path, key: str) -> tuple[float, float, float]:
    """CT-RATE spacing strings: XYSpacing '[0.75, 0.75]' (row, column) and ZSpacing '1.5'."""
    nums = re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", xy)
    try:
        if len(nums) != 2:
            raise ValueError(xy)
        return float(z), float(nums[0]), float(nums[1])
    except ValueError as e:
        raise DataError("bad_metadata", path, key, f"cannot parse XYSpacing={xy!r} ZSpacing={z!r}") from e


def ct_rate_records(
    root: str | Path, on_error: str = "raise", report_field: str = "findings"
) -> tuple[list[Record], Summary]:
    """Records of a CT-RATE tree: <split>/.../<name>.nii.gz + reports, metadata and label CSVs."""
    root = Path(root)
    summary = Summary()
    records: list[Record] = []
    report_dir = root / "radiology_text_reports"
    prefixes = sorted(p.name[: -len("_reports.csv")] for p in report_dir.glob("*_reports.csv"))
    if not prefixes:
        raise DataError("bad_source", report_dir, "-", "no <split>_reports.csv found: not a CT-RATE tree")
    for prefix in prefixes:
        # CT-RATE itself names its validation CSVs validation_*.csv but the volumes valid/valid_*.
        split = (
            prefix
            if (root / prefix).is_dir() or prefix not in CT_RATE_SPLIT_ALIASES
            else CT_RATE_SPLIT_ALIASES[prefix]
        )
        rep_path = report_dir / f"{prefix}_reports.csv"
        reports = {r["VolumeName"]: r for r in _read_csv(rep_path, ("VolumeName", "Findings_EN"))}
        meta_path = _first_existing(root / "metadata", [f"{prefix}_metadata.csv", f"{split}_metadata.csv"])
        meta = (
            {
                r["VolumeName"]: r
                for r in _read_csv(meta_path, ("VolumeName", "RescaleSlope", "RescaleIntercept"))
            }
            if meta_path
            else {}
        )
        lab_path = _first_existing(
            root / "multi_abnormality_labels",
            [f"{split}_predicted_labels.csv", f"{prefix}_predicted_labels.csv"],
        )
        labels = {r["VolumeName"]: r for r in _read_csv(lab_path, ("VolumeName",))} if lab_path else {}
        for path in sorted((root / split).rglob("*.nii.gz")):
            name = path.name
            key = safe_key(name[: -len(".nii.gz")])
            summary.found += 1
            try:
                if name not in reports:
                    raise DataError("missing_report", rep_path, key, f"no report row for {name}")
                text = _report_text(reports[name], report_field)
                m = meta.get(name)
                rec = Record(key, path, text, split, "ct-rate")
                if m is not None:
                    rec.slope, rec.intercept = float(m["RescaleSlope"]), float(m["RescaleIntercept"])
                    if m.get("XYSpacing") and m.get("ZSpacing"):
                        rec.spacing = _parse_spacing(m["XYSpacing"], m["ZSpacing"], meta_path, key)
                    if m.get("Findings"):
                        rec.extra["findings"] = json.loads(m["Findings"])
                if name in labels:
                    rec.labels = {c: int(float(v)) for c, v in labels[name].items() if c != "VolumeName"}
                records.append(rec)
            except DataError as e:
                handle(e, on_error, summary)
    return records, summary


def _first_existing(folder: Path, names: list[str]) -> Path | None:
    """The first of folder/name that exists, else None."""
    return next((folder / n for n in names if (folder / n).exists()), None)


def _report_text(row: dict, field_name: str) -> str:
    """The report text used for training: Findings_EN, Impressions_EN or both."""
    f, i = (row.get("Findings_EN") or "").strip(), (row.get("Impressions_EN") or "").strip()
    if field_name == "findings":
        return f
    if field_name == "impressions":
        return i
    if field_name == "both":
        return f"{f} Impression: {i}".strip() if i else f
    raise ValueError(f"report_field must be findings|impressions|both, got {field_name!r}")


def manifest_records(manifest: str | Path, on_error: str = "raise") -> tuple[list[Record], Summary]:
    """Records of a manifest CSV with columns path,report[,split][,id]; paths relative to the CSV."""
    manifest = Path(manifest)
    summary = Summary()
    records: list[Record] = []
    for i, row in enumerate(_read_csv(manifest, ("path", "report"))):
        summary.found += 1
        path = Path(row["path"])
        path = path if path.is_absolute() else manifest.parent / path
        name = path.name.split(".nii")[0] if ".nii" in path.name else path.stem
        key = safe_key((row.get("id") or "").strip() or name)
        try:
            if not path.exists():
                raise DataError(
                    "missing_file", manifest, key, f"row {i + 2}: path {row['path']!r} does not exist"
                )
            split = (row.get("split") or "").strip() or assign_split(key)
            records.append(Record(key, path, row["report"] or "", split, "manifest"))
        except DataError as e:
            handle(e, on_error, summary)
    return records, summary


def nifti_dir_records(root: str | Path, on_error: str = "raise") -> tuple[list[Record], Summary]:
    """Records of a directory of NIfTI files, each with its report in a sidecar <name>.txt."""
    root = Path(root)
    summary = Summary()
    records: list[Record] = []
    for path in sorted([*root.rglob("*.nii.gz"), *root.rglob("*.nii")]):
        summary.found += 1
        stem = path.name.split(".nii")[0]
        key = safe_key(stem)
        txt = path.with_name(stem + ".txt")
        try:
            if not txt.exists():
                raise DataError("missing_report", txt, key, "no sidecar report file")
            records.append(Record(key, path, txt.read_text(encoding="utf-8"), assign_split(key), "nifti"))
        except DataError as e:
            handle(e, on_error, summary)
    return records, summary


def filter_records(records: list[Record], summary: Summary, on_error: str = "raise") -> list[Record]:
    """Drop duplicate keys and empty reports (bad input, per policy), then the paper's report filter.

    The paper drops reports shorter than 10 or longer than 512 tokens and duplicate reports;
    duplicates are judged within a split (CT-RATE repeats one report over reconstructions).
    """
    out: list[Record] = []
    keys: set[str] = set()
    texts: set[tuple[str, str]] = set()
    for rec in sorted(records, key=lambda r: (r.split, r.key)):
        try:
            if rec.key in keys:
                raise DataError("duplicate_key", rec.path, rec.key, "another sample already has this key")
            if not rec.report.strip():
                raise DataError("empty_report", rec.path, rec.key, "report text is empty")
        except DataError as e:
            handle(e, on_error, summary)
            continue
        keys.add(rec.key)
        n = count_tokens(rec.report)
        norm = (rec.split, " ".join(rec.report.split()).lower())
        if n < MIN_TOKENS:
            summary.drop("report_too_short")
        elif n > MAX_TOKENS:
            summary.drop("report_too_long")
        elif norm in texts:
            summary.drop("duplicate_report")
        else:
            texts.add(norm)
            out.append(rec)
    summary.kept = len(out)
    return out


def source_records(
    source: str | Path, on_error: str = "raise", report_field: str = "findings"
) -> tuple[list[Record], Summary]:
    """Records of any source: a CT-RATE tree, a manifest .csv, or a directory of NIfTI files; filtered."""
    check_policy(on_error)
    source = Path(source)
    if source.is_file() and source.suffix == ".csv":
        records, summary = manifest_records(source, on_error)
    elif (source / "radiology_text_reports").is_dir():
        records, summary = ct_rate_records(source, on_error, report_field)
    elif source.is_dir():
        records, summary = nifti_dir_records(source, on_error)
    else:
        raise DataError("bad_source", source, "-", "not a CT-RATE tree, a manifest .csv or a NIfTI directory")
    return filter_records(records, summary, on_error), summary
