"""CT-RATE specifics: its tree, its volume names, one reconstruction per scan, the patient split.

CT-RATE names a volume ``<split>_<patient>_<scan>_<reconstruction>.nii.gz`` (``train_12_a_2`` =
reconstruction 2 of scan a of patient 12 of the official train folder). The reconstructions of a
scan share one report, so the paper keeps one per scan; this module keeps the first (lowest
reconstruction number that has a usable report row). A patient is ``<official split>_<number>``:
``train_12`` and ``valid_12`` are different people. With ``split="patient"`` (the paper, §4.1 and
A.4) the official train/ and valid/ folders are pooled and every patient goes to train / valid /
test (70/10/20) by a seeded hash of the patient id, so no patient is in two splits and the
assignment depends only on (seed, patient): not on file order, machine, or which other files exist.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from shards.ingest import (
    CT_RATE_SPLIT_ALIASES,
    DataError,
    Record,
    Summary,
    assign_split,
    handle,
    read_csv_rows,
    safe_key,
)

VOLUME_NAME = re.compile(r"(?P<split>[A-Za-z]+)_(?P<patient>\d+)_(?P<scan>[A-Za-z]+)_(?P<recon>\d+)")


def parse_volume_name(key: str) -> tuple[str, str, int] | None:
    """(patient id, scan id, reconstruction number) of a CT-RATE key, or None for another naming.

    >>> parse_volume_name("train_12_a_2")
    ('train_12', 'train_12_a', 2)
    """
    m = VOLUME_NAME.fullmatch(key)
    if m is None:
        return None
    patient = f"{m['split']}_{int(m['patient'])}"
    return patient, f"{patient}_{m['scan']}", int(m["recon"])


def _parse_spacing(xy: str, z: str, path: Path, key: str) -> tuple[float, float, float]:
    """CT-RATE spacing strings: XYSpacing '[0.75, 0.75]' (row, column) and ZSpacing '1.5'; each > 0."""
    nums = re.findall(r"[-+]?(?:nan|inf|\d*\.?\d+(?:[eE][-+]?\d+)?)", xy, flags=re.IGNORECASE)
    try:
        if len(nums) != 2:
            raise ValueError(xy)
        spacing = (float(z), float(nums[0]), float(nums[1]))
    except ValueError as e:
        raise DataError("bad_metadata", path, key, f"cannot parse XYSpacing={xy!r} ZSpacing={z!r}") from e
    for column, value in (("ZSpacing", spacing[0]), ("XYSpacing", spacing[1]), ("XYSpacing", spacing[2])):
        if not (math.isfinite(value) and value > 0):
            raise DataError(
                "bad_spacing",
                path,
                key,
                f"{column} = {xy if column == 'XYSpacing' else z!r}: spacing must be > 0 mm",
            )
    return spacing


def _float(row: dict, column: str, path: Path, key: str) -> float:
    """A finite number from a metadata column, else bad_metadata naming the column."""
    try:
        value = float(row[column])
    except (TypeError, ValueError) as e:
        raise DataError("bad_metadata", path, key, f"{column} = {row.get(column)!r} is not a number") from e
    if not math.isfinite(value):
        raise DataError("bad_metadata", path, key, f"{column} = {row[column]!r} is not finite")
    return value


def _table(
    path: Path, required: tuple[str, ...], lines: dict[str, int] | None = None
) -> tuple[dict[str, dict], dict[str, DataError], list[DataError]]:
    """A CT-RATE CSV by VolumeName: (rows, errors of bad rows whose name is known, other bad rows);
    ``lines`` (when given) receives each row's line number, to name it in later errors."""
    rows, bad = read_csv_rows(
        path, required, "VolumeName", key_of=lambda r: r.get("VolumeName", "").strip().removesuffix(".nii.gz")
    )
    by_name = {r["VolumeName"].strip(): r for _, r in rows}
    if lines is not None:
        lines.update({r["VolumeName"].strip(): line for line, r in rows})
    named = {f"{e.key}.nii.gz": e for e in bad if e.key != "-"}
    return by_name, named, [e for e in bad if e.key == "-"]


def ct_rate_records(
    root: str | Path,
    on_error: str = "raise",
    report_field: str = "findings",
    split: str = "patient",
    seed: int = 0,
) -> tuple[list[Record], Summary]:
    """Records of a CT-RATE tree: <split>/.../<name>.nii.gz + reports, metadata and label CSVs.

    One reconstruction per scan is kept (the others are counted as ``duplicate_reconstruction``);
    with split="patient" the records are re-split by patient (see the module docstring).
    """
    root = Path(root)
    summary = Summary()
    records: list[Record] = []
    report_dir = root / "radiology_text_reports"
    prefixes = sorted(p.name[: -len("_reports.csv")] for p in report_dir.glob("*_reports.csv"))
    if not prefixes:
        raise DataError("bad_source", report_dir, "-", "no <split>_reports.csv found: not a CT-RATE tree")
    for prefix in prefixes:
        # CT-RATE itself names its validation CSVs validation_*.csv but the volumes valid/valid_*.
        folder = (
            prefix
            if (root / prefix).is_dir() or prefix not in CT_RATE_SPLIT_ALIASES
            else CT_RATE_SPLIT_ALIASES[prefix]
        )
        rep_path = report_dir / f"{prefix}_reports.csv"
        reports, bad_reports, unnamed = _table(rep_path, ("Findings_EN",))
        meta_path = _first_existing(root / "metadata", [f"{prefix}_metadata.csv", f"{folder}_metadata.csv"])
        meta, bad_meta, more = (
            _table(meta_path, ("RescaleSlope", "RescaleIntercept")) if meta_path else ({}, {}, [])
        )
        unnamed += more
        lab_path = _first_existing(
            root / "multi_abnormality_labels",
            [f"{folder}_predicted_labels.csv", f"{prefix}_predicted_labels.csv"],
        )
        label_lines: dict[str, int] = {}
        labels, bad_labels, more = _table(lab_path, (), label_lines) if lab_path else ({}, {}, [])
        unnamed += more
        for e in unnamed:  # a broken row whose volume cannot be told: found, and dropped
            summary.found += 1
            handle(e, on_error, summary)
        for path in sorted((root / folder).rglob("*.nii.gz")):
            name = path.name
            key = safe_key(name[: -len(".nii.gz")])
            summary.found += 1
            try:
                for bad in (bad_reports, bad_meta, bad_labels):
                    if name in bad:
                        raise bad[name]
                if name not in reports:
                    raise DataError("missing_report", rep_path, key, f"no report row for {name}")
                rec = Record(key, path, _report_text(reports[name], report_field), folder, "ct-rate")
                m = meta.get(name)
                if m is not None:
                    rec.slope = _float(m, "RescaleSlope", meta_path, key)
                    if rec.slope == 0:  # would store an all-zero volume under its report's findings
                        raise DataError(
                            "bad_metadata", meta_path, key, "RescaleSlope = 0: the volume would be blank"
                        )
                    rec.intercept = _float(m, "RescaleIntercept", meta_path, key)
                    if m.get("XYSpacing") and m.get("ZSpacing"):
                        rec.spacing = _parse_spacing(m["XYSpacing"], m["ZSpacing"], meta_path, key)
                    if m.get("Findings"):
                        try:
                            rec.extra["findings"] = json.loads(m["Findings"])
                        except json.JSONDecodeError as e:
                            raise DataError(
                                "bad_metadata", meta_path, key, f"Findings is not JSON ({e.msg})"
                            ) from e
                if name in labels:
                    rec.labels = _labels(labels[name], lab_path, key, label_lines.get(name))
                records.append(rec)
            except DataError as e:
                handle(e, on_error, summary)
    records = one_reconstruction_per_scan(records, summary)
    for rec in records:
        parsed = parse_volume_name(rec.key)
        patient = parsed[0] if parsed else rec.key  # another naming: each volume its own patient
        rec.extra["patient"], rec.extra["official_split"] = patient, rec.split
        if split == "patient":
            rec.split = assign_split(patient, seed)
    return records, summary


def _labels(row: dict, path: Path, key: str, line: int | None) -> dict[str, int]:
    """The 0/1 labels of a label CSV row; any other value is bad_labels naming file, line and column."""
    out = {}
    for column, value in row.items():
        if column == "VolumeName":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number not in (0.0, 1.0):
            raise DataError(
                "bad_labels", path, key, f"line {line}, column {column!r}: {value!r} is not 0 or 1"
            )
        out[column] = int(number)
    return out


def one_reconstruction_per_scan(records: list[Record], summary: Summary) -> list[Record]:
    """Keep the lowest-numbered reconstruction of each scan; count the others as duplicate_reconstruction."""
    kept: dict[str, tuple[int, Record]] = {}
    out: list[Record] = []
    for rec in records:
        parsed = parse_volume_name(rec.key)
        if parsed is None:
            out.append(rec)
            continue
        _, scan, recon = parsed
        if scan in kept:
            summary.drop("duplicate_reconstruction")
            if recon >= kept[scan][0]:
                continue
        kept[scan] = (recon, rec)
    return out + [rec for _, rec in kept.values()]


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
