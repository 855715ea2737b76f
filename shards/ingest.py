"""Sources (CT-RATE layout, manifest CSV, plain NIfTI) -> records -> canonical preprocessed arrays.

Canonical array orientation (docs/DATA.md): C-order (D, H, W) where index increases
D: superior -> inferior, H: anterior -> posterior, W: patient right -> patient left.
So `arr[d]` is an axial slice seen from the feet with anterior up and the patient's right on
the image's left: the radiological display convention. Preprocessing follows the paper (A.4):
HU clip to [-1000, 200], trilinear resample, and uint8 = the window scaled to [0, 255].
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from shards.csvrows import read_csv_rows
from shards.schema import HU_WINDOW, stored_hu_range

# nibabel axis codes of the canonical (W, H, D) = NIfTI (i, j, k) order: +i -> L, +j -> P, +k -> I.
CANONICAL_AXCODES = ("L", "P", "I")
ORIENTATION = ("superior->inferior", "anterior->posterior", "right->left")
DTYPES = {"uint8": np.uint8, "int16": np.int16}
SPLIT_FRACTIONS = (("train", 0.7), ("valid", 0.1), ("test", 0.2))
SPLIT_PROTOCOLS = (
    "patient",
    "official",
)  # paper: pooled, split 70/10/20 by patient | keep the source's split
MIN_TOKENS, MAX_TOKENS = 10, 512
CT_RATE_SPLIT_ALIASES = {"validation": "valid"}  # reports/metadata CSV prefix -> volume folder
FOV_MM = 384.0  # paper A.4: 0.75 x 0.75 x 1.5 mm at 512 x 512 x 256 = a fixed 384 mm field of view
MIN_COVERAGE = 0.2  # a volume whose content fills less of the grid than this is flagged (kept)
# A name taken from a data file (split, key, id) becomes part of a file or member name: keep it plain.
# No dots (webdataset cuts member names at the first dot), at most 90 characters (USTAR name field).
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,90}")
# Where the stored values become HU (docs/DATA.md): CT-RATE v1 stores raw values that its metadata
# CSV's RescaleSlope/Intercept turn into HU; v2 stores HU while the CSV still lists intercept -1024
# (CT-CLIP issue #50). "auto" decides per volume from the values; "csv" / "header" force one.
RESCALES = ("auto", "csv", "header")
AIR_MAX_HU = -500.0  # air (2nd percentile above the padding value) must lie below this after the choice
BODY_MIN_HU = -1500.0  # and the median above this: a -1024 shift too many puts both out of range
# Bounded work per volume (docs/DATA.md): a voxel size outside this range (mm) is not a CT scan
# (a header in micrometres, a broken pixdim) and would make a huge or empty grid; a header whose
# dims ask for more voxels than this is refused before any read (2**30: e.g. 1024 x 1024 x 1024).
SPACING_RANGE_MM = (0.05, 50.0)
MAX_SOURCE_VOXELS = 1 << 30


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
    slope: float | None = None  # CT-RATE CSV: raw stored value * slope + intercept = HU (v1 only)
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
    flagged: Counter = field(default_factory=Counter)  # kept, but worth a look (e.g. low_coverage)
    rescale: Counter = field(default_factory=Counter)  # where stored values became HU: csv | header

    def drop(self, reason: str, message: str | None = None) -> None:
        self.dropped[reason] += 1
        if message and len(self.errors) < 50:
            self.errors.append(message)

    def flag(self, reason: str, message: str | None = None) -> None:
        self.flagged[reason] += 1
        if message and len(self.errors) < 50:
            self.errors.append(message)

    def as_dict(self) -> dict:
        return {
            "found": self.found,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "flagged": dict(sorted(self.flagged.items())),
            "rescale": dict(sorted(self.rescale.items())),
            "errors": self.errors,
        }


def as_data_error(
    exc: BaseException, file: str | Path, key: str, reason: str = "unreadable_sample"
) -> DataError:
    """Any exception raised while handling one sample, as a DataError naming file and key.

    A DataError passes unchanged; a MemoryError becomes ``out_of_memory``; anything else becomes
    ``reason`` with its type and message. The per-sample error boundary of the writer, the
    readers, evaluation and generate: one bad sample is one counted reason, never a dead job.
    """
    if isinstance(exc, DataError):
        return exc
    if isinstance(exc, MemoryError):
        return DataError("out_of_memory", file, key, f"MemoryError while handling this sample: {exc}")
    return DataError(reason, file, key, f"{type(exc).__name__}: {exc}")


def check_name(value: str, what: str, file: str | Path, key: str, where: str = "") -> str:
    """Return value if it is a safe split name / key ([A-Za-z0-9_-], 1-90 chars), else raise bad_name."""
    if not NAME_RE.fullmatch(value):
        raise DataError(
            "bad_name",
            file,
            key,
            f"{where}{what} {value!r} is not a safe name ([A-Za-z0-9_-], 1-90 characters)",
        )
    return value


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


def intensity_levels(data: np.ndarray) -> tuple[float, float]:
    """(air, body) levels of a CT volume: the 2nd percentile and the median of its voxels above the
    minimum (scanners fill outside the reconstruction circle with one constant, left out), on a
    strided subsample of at most ~2M voxels."""
    sample = data.ravel(order="K")[:: max(1, data.size // 2_000_000)]  # a view, never a copy
    above = sample[sample > sample.min()]
    if above.size == 0:
        above = sample
    return float(np.percentile(above, 2)), float(np.median(above))


def plausible_hu(air: float, body: float) -> bool:
    """Air near -1000 HU and a body that is not below air: values that really are HU."""
    return air <= AIR_MAX_HU and body >= BODY_MIN_HU


def _header_values(img, shape: tuple[int, ...]) -> np.ndarray:
    """The stored values with the header's own scaling, in their own dtype when the header does not
    scale (an int16 scan stays int16: no whole-volume float copy), else float32."""
    data = np.asanyarray(img.dataobj)
    if data.dtype.kind == "f" and data.dtype.itemsize > 4:
        data = data.astype(np.float32)
    return data.reshape(shape)


def read_hu(img, rec: Record, shape: tuple[int, ...], rescale: str = "auto") -> tuple[np.ndarray, str]:
    """The stored values as HU (real dtype: integers as stored, else float32), and which rescale
    made them HU ("csv" or "header").

    Without a CSV rescale (manifest, NIfTI folder) the header's own scaling is used, unchecked.
    With one (CT-RATE) ``auto`` takes the header's reading when its values are plausible HU (v2,
    or a header that scales itself), else the CSV's (v1); either choice must give air below
    -500 HU and a median above -1500 HU, or the volume is refused naming both readings.
    """
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    if rec.slope is None:
        if rescale == "csv":
            raise DataError(
                "no_csv_rescale", rec.path, rec.key, "--rescale csv, but no metadata CSV gives one"
            )
        return _header_values(img, shape), "header"
    header = _header_values(img, shape)
    levels = {"header": intensity_levels(header)}
    if rescale != "csv" and (rescale == "header" or plausible_hu(*levels["header"])):
        choice, data = "header", header
    else:
        del header
        data = np.asarray(img.dataobj.get_unscaled(), dtype=np.float32).reshape(shape)
        data *= np.float32(rec.slope)  # in place: one float32 volume, no second copy
        data += np.float32(rec.intercept or 0.0)
        choice = "csv"
        levels["csv"] = intensity_levels(data)
    if not plausible_hu(*levels[choice]):
        seen = "; ".join(f"{k}: air {a:.0f} HU, median {b:.0f} HU" for k, (a, b) in levels.items())
        raise DataError(
            "implausible_hu",
            rec.path,
            rec.key,
            f"--rescale {rescale} gives values that are not HU ({seen}); air must be below "
            f"{AIR_MAX_HU:.0f} and the median above {BODY_MIN_HU:.0f}. CT-RATE v1 stores raw values "
            "(use the CSV rescale), v2 stores HU (use the header)",
        )
    return data, choice


def load_canonical(rec: Record, rescale: str = "auto") -> tuple[np.ndarray, tuple[float, float, float]]:
    """Load a NIfTI as float32 HU in canonical (D, H, W) order, with its (z, y, x) spacing in mm.

    Which rescale made the values HU (``read_hu``) is recorded in ``rec.extra["rescale"]``, so it
    travels into the sample's json.
    """
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
    check_budget(img, rec, shape)
    try:
        data, rec.extra["rescale"] = read_hu(img, rec, shape, rescale)
    except DataError:
        raise
    except Exception as e:
        raise DataError("unreadable_nifti", rec.path, rec.key, f"{type(e).__name__}: {e}") from e
    if data.dtype.kind == "f":  # integers are always finite; floats are checked a plane at a time
        bad = sum(int(np.count_nonzero(~np.isfinite(p))) for p in data)
        if bad:
            raise DataError("non_finite", rec.path, rec.key, f"{bad} NaN/Inf voxels")
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
    lo, hi = SPACING_RANGE_MM
    if not all(np.isfinite(s) and lo <= s <= hi for s in spacing):
        raise DataError(
            "bad_spacing", rec.path, rec.key, f"spacing (z, y, x) = {spacing} mm is outside {lo}-{hi} mm"
        )
    # A view (flips and transposes only): preprocess reads it a plane at a time, never copies it whole.
    return data.transpose(2, 1, 0), tuple(float(s) for s in spacing)


def check_budget(img, rec: Record, shape: tuple[int, ...]) -> None:
    """Refuse, before any voxel is read, a volume of a non-real voxel type or more voxels than
    ``MAX_SOURCE_VOXELS`` (its header's dims)."""
    kind = np.dtype(img.get_data_dtype()).kind
    if kind not in "biuf":
        raise DataError(
            "bad_dtype", rec.path, rec.key, f"voxel type {img.get_data_dtype()} is not a real number type"
        )
    if math.prod(int(n) for n in shape) > MAX_SOURCE_VOXELS:
        raise DataError(
            "too_large",
            rec.path,
            rec.key,
            f"header dims {tuple(int(n) for n in shape)} x {np.dtype(img.get_data_dtype()).itemsize} bytes "
            f"exceed the budget of {MAX_SOURCE_VOXELS} voxels per volume",
        )


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

    uint8 is the paper's window (HU_WINDOW) scaled to 0..255; int16 is HU, clipped to
    INT16_HU_RANGE only, so calcium and bone keep their values (``shards.schema.stored_hu_range``).

    With target_spacing the volume is first resampled to that spacing, then centre-cropped or
    padded with air to hr_size (CT-RATE's recipe); without it, it is resized straight to hr_size.
    ``hu`` may be any real dtype and any view: it is read a plane at a time (``shards.resample``),
    so the work memory is the output plus a few planes.
    """
    from shards.resample import resampled_planes

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    lo, hi = HU_WINDOW
    clip = stored_hu_range(dtype)
    hr_size = tuple(int(m) for m in hr_size)
    if target_spacing is not None:
        # Cut the source to (a little more than) the part the grid keeps before resampling, so a
        # huge or finely sampled volume never makes a huge intermediate array.
        keep = []
        for n, s, t, m in zip(hu.shape, spacing, target_spacing, hr_size):
            need = min(n, math.ceil(m * t / s) + 2)
            a = (n - need) // 2
            keep.append(slice(a, a + need))
        hu = hu[tuple(keep)]
        shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(hu.shape, spacing, target_spacing))
        out_spacing = tuple(float(t) for t in target_spacing)
    else:
        shape = hr_size
        out_spacing = tuple(float(s * n / m) for s, n, m in zip(spacing, hu.shape, hr_size))

    def quantise(x: np.ndarray) -> np.ndarray:
        if dtype == "uint8":
            return np.rint((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        return np.rint(x).astype(np.int16)

    out = np.empty(hr_size, DTYPES[dtype])
    out[...] = quantise(np.full((1, 1), lo, np.float32))  # air (-1000 HU) where the grid is padded
    for d, plane in resampled_planes(hu, shape, clip, hr_size, fill=lo):
        out[d] = quantise(plane)
    return out, out_spacing


def fov_spacing(hr_size: tuple[int, int, int], fov_mm: float = FOV_MM) -> tuple[float, float, float]:
    """Target (z, y, x) spacing that makes the grid cover fov_mm on every axis (paper A.4: 384 mm)."""
    if not (math.isfinite(fov_mm) and fov_mm > 0):
        raise ValueError(f"field of view must be a positive number of mm, got {fov_mm!r}")
    return tuple(fov_mm / m for m in hr_size)  # type: ignore[return-value]


def coverage(
    shape: tuple[int, ...], spacing: tuple[float, ...], hr_size: tuple[int, ...], target_spacing=None
) -> float:
    """Fraction of the output grid filled by the source volume (1.0 when resized straight to the grid)."""
    if target_spacing is None:
        return 1.0
    return float(
        math.prod(min(1.0, n * s / (m * t)) for n, s, m, t in zip(shape, spacing, hr_size, target_spacing))
    )


def array_sha256(arr: np.ndarray) -> str:
    """sha256 of an array's C-order bytes: the checksum stored per sample."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


# ---- Sources -> records. ----


def count_tokens(text: str) -> int:
    """Words and punctuation marks: a tokenizer-free stand-in for the paper's token length filter."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def assign_split(key: str, seed: int = 0) -> str:
    """Deterministic 70/10/20 train/valid/test split from a hash of the key (a patient id or a volume key).

    Each key's split depends on the key and the seed only: not on file order, machine or on which
    other keys exist, so adding samples never moves a patient between splits.
    """
    text = key if seed == 0 else f"{seed}:{key}"
    u = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32
    acc = 0.0
    for name, frac in SPLIT_FRACTIONS:
        acc += frac
        if u < acc:
            return name
    return SPLIT_FRACTIONS[-1][0]


def safe_key(text: str) -> str:
    """A webdataset-safe key from a file name: ASCII letters, digits, _ and - (no dots, no slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _manifest_key(row: dict) -> str:
    """The key of a manifest row: its id, else the file name without .nii/.nii.gz (sanitised)."""
    if (row.get("id") or "").strip():
        return row["id"].strip()
    name = Path(row.get("path") or "").name
    return safe_key(name.split(".nii")[0] if ".nii" in name else Path(name).stem)


def manifest_records(
    manifest: str | Path, on_error: str = "raise", seed: int = 0
) -> tuple[list[Record], Summary]:
    """Records of a manifest CSV with columns path,report[,split][,id][,patient]; paths relative to the CSV.

    The split is the row's ``split`` if given, else a hash of ``patient`` (when the column is
    there) or of the key. ``id`` and ``split`` become file and member names, so they must be
    safe names (``check_name``); a key from a file name is sanitised (``safe_key``).
    """
    manifest = Path(manifest)
    summary = Summary()
    records: list[Record] = []
    rows, bad = read_csv_rows(manifest, ("path", "report"), "path", key_of=_manifest_key)
    for e in bad:
        summary.found += 1
        handle(e, on_error, summary)
    for line, row in rows:
        summary.found += 1
        key = _manifest_key(row) or "-"
        where = f"line {line}: "
        try:
            check_name(key, "id", manifest, key, where)
            path = Path(row["path"])
            path = path if path.is_absolute() else manifest.parent / path
            if not row["path"].strip() or not path.is_file():
                raise DataError("missing_file", manifest, key, f"{where}path {row['path']!r} does not exist")
            split = (row.get("split") or "").strip()
            if split:
                check_name(split, "split", manifest, key, where)
            else:
                split = assign_split((row.get("patient") or "").strip() or key, seed)
            rec = Record(key, path, row["report"] or "", split, "manifest")
            if (row.get("patient") or "").strip():
                rec.extra["patient"] = row["patient"].strip()
            records.append(rec)
        except DataError as e:
            handle(e, on_error, summary)
    return records, summary


def nifti_dir_records(
    root: str | Path, on_error: str = "raise", seed: int = 0
) -> tuple[list[Record], Summary]:
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
            raw = txt.read_bytes()
            try:
                report = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    "not_utf8", txt, key, f"byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8"
                ) from e
            records.append(Record(key, path, report, assign_split(key, seed), "nifti"))
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
            check_name(rec.split, "split", rec.path, rec.key)
            check_name(rec.key, "key", rec.path, rec.key)
            if rec.key in keys:
                raise DataError("duplicate_key", rec.path, rec.key, "another sample already has this key")
            if not re.search(r"[^\W_]", rec.report):  # only spaces, NULs, dots, zero-width marks...
                raise DataError("empty_report", rec.path, rec.key, "report has no letter or digit")
        except DataError as e:
            handle(e, on_error, summary)
            continue
        keys.add(rec.key)
        n = count_tokens(rec.report)
        norm = (rec.split, " ".join(rec.report.split()).lower())
        if n < MIN_TOKENS:
            summary.drop("report_too_short")
        elif n > MAX_TOKENS:
            summary.drop(
                "report_too_long", f"report_too_long: {rec.path} [key {rec.key}]: {n} tokens > {MAX_TOKENS}"
            )
        elif norm in texts:
            summary.drop("duplicate_report")
        else:
            texts.add(norm)
            out.append(rec)
    summary.kept = len(out)
    return out


def source_records(
    source: str | Path,
    on_error: str = "raise",
    report_field: str = "findings",
    split: str = "patient",
    seed: int = 0,
) -> tuple[list[Record], Summary]:
    """Records of any source: a CT-RATE tree, a manifest .csv, or a directory of NIfTI files; filtered.

    split="patient" (the paper): CT-RATE's official folders are pooled and re-split 70/10/20 by
    patient with ``seed``; "official" keeps CT-RATE's train/valid folders. Manifests keep their
    ``split`` column when they have one; other samples are split by a hash of patient or key.
    """
    check_policy(on_error)
    if split not in SPLIT_PROTOCOLS:
        raise ValueError(f"split must be one of {SPLIT_PROTOCOLS}, got {split!r}")
    source = Path(source)
    if source.is_file() and source.suffix == ".csv":
        records, summary = manifest_records(source, on_error, seed)
    elif (source / "radiology_text_reports").is_dir():
        from shards.ctrate import ct_rate_records  # shards.ctrate imports this module

        records, summary = ct_rate_records(source, on_error, report_field, split, seed)
    elif source.is_dir():
        records, summary = nifti_dir_records(source, on_error, seed)
    else:
        raise DataError("bad_source", source, "-", "not a CT-RATE tree, a manifest .csv or a NIfTI directory")
    return filter_records(records, summary, on_error), summary
