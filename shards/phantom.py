"""Synthetic chest-CT phantom set in CT-RATE's own layout: the embedded default dataset.

Each volume has a body, lungs, mediastinal fat, heart, aorta, trachea, spine and liver at
realistic HU with Gaussian noise, plus findings drawn from CT-RATE's abnormality classes at
known places and sizes. The report states every finding consistently with the volume (side,
lobe, size in mm) and says "normal" where a finding is absent. The set exists to show what HR buys.

HR-only vs LR-visible, by physics: every finding records ``lr_fill``, the largest fraction of one
LR voxel its HR voxels fill after an average-pool by ``lr_factor`` (2 = the cpu presets' HR/LR
ratio; the paper's is 4), and ``visibility`` = "hr-only" when that is below ``HR_ONLY_FILL``
(0.35: a one-voxel nodule keeps 1/8 of its contrast at 2x), else "lr-visible". The kinds are
fixed before any training (``shards.phantom_report.HR_ONLY_KINDS``): millimetric nodules and aortic
/ coronary calcification spots are one HR voxel each (spots of one finding in different LR
voxels); large nodules, effusions, consolidation, opacity, emphysema, cardiomegaly, pericardial
effusion and lymphadenopathy span LR voxels. tests/test_shards_phantom.py checks that every
finding's physical visibility agrees with its kind's group at the main job's size (32x64x64,
lr_factor 2); on coarser grids (16x32x32) some LR-visible findings shrink to one voxel, so the
groups are only meaningful from 32x64x64 up. Each kind is drawn independently with ``prevalence``.

Usage: python -m shards.phantom --out DIR --n N --size D,H,W --seed S
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from shards.io import atomic_write, write_bytes_atomic
from shards.phantom_report import KINDS, pick, write_report
from shards.schema import CLASSES, parse_size

# Field of view in mm (z, y, x) that the grid covers whatever its size; spacing = FOV / size.
FOV_MM = (300.0, 360.0, 360.0)
# Stored value = HU - INTERCEPT (int16), as CT-RATE's RescaleSlope/RescaleIntercept describe.
SLOPE, INTERCEPT = 1.0, -1024.0
NOISE_HU = 12.0
REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
METADATA_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing", "Findings")
LOBES = {"right": ("upper", "middle", "lower"), "left": ("upper", "lower")}
LN_STATIONS = {  # name -> centre (x, y, z) in mm, inside the mediastinal fat
    "right paratracheal": (-20.0, -8.0, 85.0),
    "subcarinal": (0.0, 12.0, 128.0),
    "prevascular": (-5.0, -45.0, 100.0),
}
# Bump when a seed's volumes or reports change (2: small/large nodule kinds, one-voxel calcifications,
# per-finding lr_fill / visibility).
PHANTOM_VERSION = 2
# A finding is HR-only when no LR voxel is filled to this fraction by it (see the module docstring).
HR_ONLY_FILL = 0.35
# Classes the phantom can draw; the other CT-RATE classes are always 0 in its labels.
PHANTOM_CLASSES = (
    "Lung nodule",
    "Pleural effusion",
    "Consolidation",
    "Lung opacity",
    "Emphysema",
    "Cardiomegaly",
    "Pericardial effusion",
    "Arterial wall calcification",
    "Coronary artery wall calcification",
    "Lymphadenopathy",
)


@dataclass
class Grid:
    """Voxel-centre coordinates in mm: z down from the top, y anterior->posterior, x right->left."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float] = field(init=False)

    def __post_init__(self) -> None:
        self.spacing = tuple(f / s for f, s in zip(FOV_MM, self.size))
        d, h, w = self.size
        sz, sy, sx = self.spacing
        self.z = (np.arange(d, dtype=np.float32) + 0.5) * sz
        self.y = (np.arange(h, dtype=np.float32) + 0.5) * sy - FOV_MM[1] / 2
        self.x = (np.arange(w, dtype=np.float32) + 0.5) * sx - FOV_MM[2] / 2

    def snap(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """Move a point to the nearest voxel centre, so a tiny sphere always fills one voxel."""
        iz = int(np.clip(np.argmin(np.abs(self.z - z)), 0, self.size[0] - 1))
        iy = int(np.clip(np.argmin(np.abs(self.y - y)), 0, self.size[1] - 1))
        ix = int(np.clip(np.argmin(np.abs(self.x - x)), 0, self.size[2] - 1))
        return float(self.x[ix]), float(self.y[iy]), float(self.z[iz])

    def ellipsoid(self, c: tuple[float, float, float], r: tuple[float, float, float]):
        """(slices, mask) of an axis-aligned ellipsoid (centre x,y,z; radii x,y,z), bbox only."""
        cx, cy, cz = c
        rx, ry, rz = r
        sl = (_span(self.z, cz, rz), _span(self.y, cy, ry), _span(self.x, cx, rx))
        zz = ((self.z[sl[0]] - cz) / rz)[:, None, None] ** 2
        yy = ((self.y[sl[1]] - cy) / ry)[None, :, None] ** 2
        xx = ((self.x[sl[2]] - cx) / rx)[None, None, :] ** 2
        return sl, (zz + yy + xx) <= 1.0

    def capsule(self, a: tuple[float, float, float], b: tuple[float, float, float], r: float):
        """(slices, mask) of a cylinder with round ends from point a to point b (x,y,z), radius r."""
        lo = [min(a[i], b[i]) for i in range(3)]
        hi = [max(a[i], b[i]) for i in range(3)]
        cen = [(lo[i] + hi[i]) / 2 for i in range(3)]
        half = [(hi[i] - lo[i]) / 2 + r for i in range(3)]
        sl = (_span(self.z, cen[2], half[2]), _span(self.y, cen[1], half[1]), _span(self.x, cen[0], half[0]))
        pz = self.z[sl[0]][:, None, None] - a[2]
        py = self.y[sl[1]][None, :, None] - a[1]
        px = self.x[sl[2]][None, None, :] - a[0]
        d = np.array(b, dtype=np.float32) - np.array(a, dtype=np.float32)
        t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / max(float(d @ d), 1e-6), 0.0, 1.0)
        dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2
        return sl, dist2 <= r * r


def _span(coords: np.ndarray, c: float, r: float) -> slice:
    """Index range of coordinates within [c - r, c + r]."""
    lo = int(np.searchsorted(coords, c - r, side="left"))
    hi = int(np.searchsorted(coords, c + r, side="right"))
    return slice(lo, max(lo, hi))


def _paint(vol: np.ndarray, shape, hu: float, where: np.ndarray | None = None) -> None:
    """Set voxels of a (slices, mask) shape to hu, optionally only where a same-shaped mask holds."""
    sl, m = shape
    if where is not None:
        m = m & where[sl]
    vol[sl][m] = hu


def _lungs(rng: np.random.Generator, s: float) -> dict[str, dict]:
    """Right and left lung ellipsoids (centre, radii) with per-patient jitter."""
    j = rng.uniform(0.93, 1.07, size=2)
    return {
        "right": {"c": (-68.0 * s, 5.0, 130.0), "r": (52.0 * s * j[0], 82.0 * s, 112.0 * j[1])},
        "left": {"c": (68.0 * s, 5.0, 135.0), "r": (47.0 * s * j[0], 80.0 * s, 108.0 * j[1])},
    }


def _lobe_point(rng: np.random.Generator, lung: dict, lobe: str, in_lung) -> tuple[float, float, float]:
    """A random point inside the given lobe: upper = top, middle/lingula = anterior-low, lower = posterior-low."""
    (cx, cy, cz), (rx, ry, rz) = lung["c"], lung["r"]
    zr = {"upper": (-0.75, -0.2), "middle": (0.1, 0.55), "lower": (0.2, 0.75)}[lobe]
    yr = {"upper": (-0.6, 0.6), "middle": (-0.7, -0.1), "lower": (0.05, 0.7)}[lobe]
    for _ in range(200):
        p = (
            cx + rng.uniform(-0.6, 0.6) * rx,
            cy + rng.uniform(*yr) * ry,
            cz + rng.uniform(*zr) * rz,
        )
        if in_lung(p):
            return p
    return (cx, cy + np.mean(yr) * ry, cz + np.mean(zr) * rz)


def _draw_findings(
    rng: np.random.Generator, grid: Grid, prevalence: float, classes=None, lr_factor: int = 2
) -> list[dict]:
    """Pick this patient's findings (class + kind + details); drawing happens in make_volume.

    ``classes`` (CT-RATE class names or finding kinds) forces exactly those; "Lung nodule" alone
    forces one large nodule.
    """
    out: list[dict] = []
    for kind, cls in KINDS.items():
        drawn = rng.random() < prevalence
        if classes is not None:
            drawn = kind in classes or (cls in classes and kind != "small nodule")
        if not drawn:
            continue
        side = str(rng.choice(["right", "left"]))
        if kind in ("small nodule", "large nodule"):
            for _ in range(int(rng.integers(1, 3))):
                side = str(rng.choice(["right", "left"]))
                lobe = str(rng.choice(LOBES[side]))
                pitch = min(grid.spacing[1:])
                # Millimetric: under one in-plane voxel, so it paints exactly its centre voxel.
                # Large: 1.5-2.5 LR voxels across, so it fills most of at least one LR voxel.
                small = kind == "small nodule"
                d_mm = rng.uniform(0.6, 0.95) * pitch if small else rng.uniform(1.5, 2.5) * pitch * lr_factor
                out.append(
                    {"class": cls, "kind": kind, "side": side, "lobe": lobe, "size_mm": round(float(d_mm), 1)}
                )
        elif cls == "Pleural effusion":
            sides = [side] if rng.random() < 0.6 else ["right", "left"]
            for sd in sides:
                out.append({"class": cls, "kind": kind, "side": sd, "size_mm": int(rng.integers(15, 41))})
        elif cls in ("Consolidation", "Lung opacity"):
            lobe = str(rng.choice(LOBES[side]))
            out.append(
                {"class": cls, "kind": kind, "side": side, "lobe": lobe, "size_mm": int(rng.integers(25, 56))}
            )
        elif cls == "Pericardial effusion":
            out.append({"class": cls, "kind": kind, "size_mm": int(rng.integers(8, 16))})
        elif cls == "Lymphadenopathy":
            names = sorted(rng.choice(list(LN_STATIONS), size=int(rng.integers(1, 3)), replace=False))
            out.append(
                {
                    "class": cls,
                    "kind": kind,
                    "stations": [str(n) for n in names],
                    "size_mm": int(rng.integers(18, 30)),
                }
            )
        elif cls == "Arterial wall calcification":
            out.append({"class": cls, "kind": kind, "count": int(rng.integers(4, 9))})
        elif cls == "Coronary artery wall calcification":
            out.append({"class": cls, "kind": kind, "count": int(rng.integers(2, 6))})
        else:  # Emphysema, Cardiomegaly
            out.append({"class": cls, "kind": kind})
    return out


def lr_fill(mask: np.ndarray, factor: int) -> float:
    """Largest fraction of one LR voxel (an average-pooled ``factor``^3 block) that ``mask`` fills."""
    if not mask.any():
        return 0.0
    pad = [(0, (-n) % factor) for n in mask.shape]
    m = np.pad(mask.astype(np.float32), pad)
    d, h, w = (n // factor for n in m.shape)
    return float(m.reshape(d, factor, h, factor, w, factor).mean(axis=(1, 3, 5)).max())


def make_volume(
    size: tuple[int, int, int],
    seed: int,
    index: int,
    prevalence: float = 0.3,
    classes=None,
    lr_factor: int = 2,
):
    """Build one phantom: (HU int16 array in canonical (D,H,W) = (S->I, A->P, R->L), spacing, findings).

    `classes` (a set of class names or finding kinds) forces exactly those findings instead of
    drawing by prevalence. Every finding gets ``lr_fill`` and ``visibility`` at ``lr_factor``.
    """
    rng = np.random.default_rng([seed, index])
    grid = Grid(size)
    findings = _draw_findings(rng, grid, prevalence, classes, lr_factor)
    masks = [np.zeros(size, dtype=bool) for _ in findings]
    has = {f["class"] for f in findings}
    s = float(rng.uniform(0.92, 1.08))  # patient build
    vol = np.full(size, -1000.0, dtype=np.float32)

    # Body: elliptic cross-section along the whole z range, a subcutaneous fat rim, soft tissue inside.
    yy, xx = grid.y[:, None], grid.x[None, :]
    body = (xx / (150 * s)) ** 2 + (yy / (112 * s)) ** 2 <= 1.0
    inner = (xx / (150 * s - 12)) ** 2 + (yy / (112 * s - 12)) ** 2 <= 1.0
    vol[:, body] = -100.0
    vol[:, inner] = 40.0
    _paint(vol, grid.ellipsoid((-40.0, 10.0, 295.0), (110.0 * s, 90.0 * s, 75.0)), 60.0)  # liver

    lungs = _lungs(rng, s)
    lung_hu = -920.0 if "Emphysema" in has else -850.0
    lung_mask = np.zeros(size, dtype=bool)
    for lung in lungs.values():
        sl, m = grid.ellipsoid(lung["c"], lung["r"])
        lung_mask[sl] |= m
    vol[lung_mask] = lung_hu
    for f, fm in zip(findings, masks):
        if f["class"] == "Emphysema":
            fm |= lung_mask  # the whole lung is darker

    def in_lung(p: tuple[float, float, float]) -> bool:
        iz, iy, ix = (
            int(np.argmin(np.abs(a - v))) for a, v in ((grid.z, p[2]), (grid.y, p[1]), (grid.x, p[0]))
        )
        return bool(lung_mask[iz, iy, ix])

    def in_aerated_lung(p: tuple[float, float, float]) -> bool:
        """Air-like lung all around (1 voxel in z, 2 in-plane): not in or at an effusion,
        consolidation, the mediastinum or the chest wall, so a one-voxel nodule stands out."""
        iz, iy, ix = (
            int(np.argmin(np.abs(a - v))) for a, v in ((grid.z, p[2]), (grid.y, p[1]), (grid.x, p[0]))
        )
        near = (slice(max(0, iz - 1), iz + 2), slice(max(0, iy - 2), iy + 3), slice(max(0, ix - 2), ix + 3))
        return bool(lung_mask[near].all()) and bool((vol[near] < -500).all())

    # Mediastinum: fat between the lungs, then the heart inside a pericardial fat layer.
    _paint(vol, grid.ellipsoid((0.0, -10.0, 125.0), (38.0, 62.0, 105.0)), -90.0)
    heart_c = (18.0 + rng.uniform(-5, 5), -38.0 + rng.uniform(-4, 4), 185.0)
    heart_r = np.array([55.0, 45.0, 46.0]) * s * (1.35 if "Cardiomegaly" in has else 1.0)
    peri = next((f["size_mm"] for f in findings if f["class"] == "Pericardial effusion"), 0)
    _paint(vol, grid.ellipsoid(heart_c, tuple(heart_r + peri + 4.0)), -100.0)
    if peri:
        _paint(vol, grid.ellipsoid(heart_c, tuple(heart_r + peri)), 5.0)
    _paint(vol, grid.ellipsoid(heart_c, tuple(heart_r)), 45.0)
    for f, fm in zip(findings, masks):
        if f["class"] in ("Cardiomegaly", "Pericardial effusion"):
            # Cardiomegaly: the shell the enlarged heart adds; effusion: the fluid shell.
            inner = heart_r / 1.35 if f["class"] == "Cardiomegaly" else heart_r
            outer = heart_r if f["class"] == "Cardiomegaly" else heart_r + peri
            sl, m = grid.ellipsoid(heart_c, tuple(outer))
            fm[sl] |= m
            sl, m = grid.ellipsoid(heart_c, tuple(inner))
            fm[sl] &= ~m

    # Aorta (ascending, arch, descending), trachea + main bronchi, spine with canal.
    asc_top, desc_top = (8.0, -22.0, 85.0), (26.0, 42.0, 85.0)
    aorta = [
        ((8.0, -22.0, 150.0), asc_top, 14.0),
        (asc_top, desc_top, 13.0),
        (desc_top, (26.0, 42.0, 300.0), 12.0),
    ]
    for a, b, r in aorta:
        _paint(vol, grid.capsule(a, b, r), 40.0)
    carina = (0.0, -2.0, 115.0)
    for a, b, r in [
        ((0.0, -5.0, 0.0), carina, 9.0),
        (carina, (-45.0, 5.0, 138.0), 6.0),
        (carina, (42.0, 5.0, 140.0), 6.0),
    ]:
        _paint(vol, grid.capsule(a, b, r), -1000.0)
    _paint(vol, grid.capsule((0.0, 75.0, 0.0), (0.0, 75.0, 300.0), 19.0), 350.0)
    _paint(vol, grid.capsule((0.0, 100.0, 0.0), (0.0, 100.0, 300.0), 7.0), 20.0)

    # Findings, painted with their stated side / lobe / size; fm collects each one's voxels.
    # Diffuse findings first, focal ones (nodules, calcifications) last: nothing paints over them.
    focal = ("Lung nodule", "Arterial wall calcification", "Coronary artery wall calcification")
    order = sorted(range(len(findings)), key=lambda i: findings[i]["class"] in focal)
    for f, fm in ((findings[i], masks[i]) for i in order):
        cls = f["class"]

        def paint(shape, hu: float, where: np.ndarray | None = None, fm: np.ndarray = fm) -> None:
            _paint(vol, shape, hu, where)
            sl, m = shape
            fm[sl] |= m if where is None else m & where[sl]

        if cls == "Emphysema":
            for _ in range(int(rng.integers(12, 25))):
                side = lungs[str(rng.choice(["right", "left"]))]
                p = _lobe_point(rng, side, str(rng.choice(["upper", "lower"])), in_lung)
                r = float(rng.uniform(4.0, 9.0))
                paint(grid.ellipsoid(p, (r, r, r)), -1000.0, where=lung_mask)
        elif cls == "Lung nodule":
            p = grid.snap(*_lobe_point(rng, lungs[f["side"]], f["lobe"], in_aerated_lung))
            r = f["size_mm"] / 2
            paint(grid.ellipsoid(p, (r, r, r)), 30.0)
            centre = tuple(
                int(np.argmin(np.abs(a - v))) for a, v in ((grid.z, p[2]), (grid.y, p[1]), (grid.x, p[0]))
            )
            vol[centre] = 30.0
            fm[centre] = True
            f["center_mm"] = [round(v, 1) for v in p]
        elif cls in ("Consolidation", "Lung opacity"):
            p = _lobe_point(rng, lungs[f["side"]], f["lobe"], in_lung)
            hu = 25.0 if cls == "Consolidation" else -560.0
            for _ in range(3):  # a patch: three overlapping blobs, kept inside the lung
                q = tuple(v + rng.uniform(-0.25, 0.25) * f["size_mm"] for v in p)
                r = f["size_mm"] / 2 * rng.uniform(0.6, 1.0)
                paint(grid.ellipsoid(q, (r, r * 0.8, r)), hu, where=lung_mask)
            f["center_mm"] = [round(v, 1) for v in p]
        elif cls == "Pleural effusion":
            (cx, cy, cz), (rx, ry, rz) = lungs[f["side"]]["c"], lungs[f["side"]]["r"]
            # Dependent fluid: the posterior size_mm of each antero-posterior lung column.
            sl, m = grid.ellipsoid((cx, cy, cz), (rx, ry, rz))
            zz = ((grid.z[sl[0]] - cz) / rz)[:, None, None] ** 2
            xx = ((grid.x[sl[2]] - cx) / rx)[None, None, :] ** 2
            back = cy + ry * np.sqrt(np.clip(1.0 - zz - xx, 0.0, None))
            fluid = m & (grid.y[sl[1]][None, :, None] >= back - f["size_mm"]) & lung_mask[sl]
            vol[sl][fluid] = 15.0
            fm[sl] |= fluid
        elif cls == "Lymphadenopathy":
            for name in f["stations"]:
                c = LN_STATIONS[name]
                r = f["size_mm"] / 2
                paint(grid.ellipsoid(c, (r * 1.2, r, r * 1.4)), 45.0)
        elif cls in ("Arterial wall calcification", "Coronary artery wall calcification"):
            # One-voxel spots (radius under half a voxel), each in an LR voxel of its own.
            used: set[tuple[int, ...]] = set()
            for p in _calcification_points(rng, f, aorta, heart_c, heart_r):
                p = grid.snap(*p)
                idx = tuple(
                    int(np.argmin(np.abs(a - v))) for a, v in ((grid.z, p[2]), (grid.y, p[1]), (grid.x, p[0]))
                )
                block = tuple(i // lr_factor for i in idx)
                if block in used:
                    continue
                used.add(block)
                vol[idx] = 800.0
                fm[idx] = True

    for f, fm in zip(findings, masks):
        f["lr_fill"] = round(lr_fill(fm, lr_factor), 3)
        f["visibility"] = "hr-only" if f["lr_fill"] < HR_ONLY_FILL else "lr-visible"

    vol += rng.standard_normal(size, dtype=np.float32) * NOISE_HU
    hu = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    return hu, grid.spacing, findings


def _calcification_points(rng, f: dict, aorta, heart_c, heart_r) -> list[tuple[float, float, float]]:
    """Candidate spots (x, y, z in mm) on the aortic wall or the heart's surface (coronaries)."""
    points = []
    if f["class"] == "Arterial wall calcification":
        for _ in range(f["count"]):
            a, b, r = aorta[int(rng.integers(0, 3))]
            t = rng.uniform(0.1, 0.9)
            ang = rng.uniform(0, 2 * np.pi)
            points.append(
                (
                    a[0] + t * (b[0] - a[0]) + r * np.cos(ang),
                    a[1] + t * (b[1] - a[1]) + r * np.sin(ang),
                    a[2] + t * (b[2] - a[2]),
                )
            )
    else:
        for _ in range(f["count"]):
            ang = rng.uniform(-0.9, 0.9)
            points.append(
                (
                    heart_c[0] + heart_r[0] * np.sin(ang),
                    heart_c[1] - heart_r[1] * np.cos(ang) * 0.9,
                    heart_c[2] - heart_r[2] * 0.5,
                )
            )
    return points


# ---- Writing the set in CT-RATE's layout. ----


def volume_name(split: str, pid: int) -> str:
    """CT-RATE file name <split>_<pid>_<scan>_<recon>.nii.gz (one scan 'a', reconstruction 1)."""
    return f"{split}_{pid}_a_1.nii.gz"


def volume_path(root: Path, name: str) -> Path:
    """CT-RATE path <split>/<split>_<pid>/<split>_<pid>_<scan>/<name>."""
    split, pid, scan = name.split("_")[:3]
    return root / split / f"{split}_{pid}" / f"{split}_{pid}_{scan}" / name


def save_nifti(hu: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    """Save a canonical (S->I, A->P, R->L) HU array as int16 NIfTI in LPS (x: ->L, y: ->P, z: ->S), atomically."""
    sz, sy, sx = spacing
    data = np.ascontiguousarray(
        (hu.astype(np.int32) - int(INTERCEPT)).astype(np.int16).transpose(2, 1, 0)[:, :, ::-1]
    )
    img = nib.Nifti1Image(data, np.diag([-sx, -sy, sz, 1.0]))
    img.header.set_slope_inter(SLOPE, INTERCEPT)
    img.header.set_xyzt_units("mm")
    # gzip with mtime 0: the same seed gives the same bytes on every machine and run.
    write_bytes_atomic(path, gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def _one(args: tuple[str, int, str, tuple[int, int, int], int, int, float, int]) -> dict:
    """Generate, save and describe one volume (runs in a worker process)."""
    out, idx, split, size, pid, seed, prevalence, lr_factor = args
    hu, spacing, findings = make_volume(size, seed, idx, prevalence, lr_factor=lr_factor)
    name = volume_name(split, pid)
    save_nifti(hu, spacing, volume_path(Path(out), name))
    rng = np.random.default_rng([seed, idx, 1])
    fnd, imp = write_report(findings, rng)
    clinical = pick(rng, "clinical")
    tech = f"Non-contrast axial images of the thorax were obtained with {spacing[0]:.1f} mm slice thickness."
    labels = {c: int(any(f["class"] == c for f in findings)) for c in CLASSES}
    return {
        "split": split,
        "report": {
            "VolumeName": name,
            "ClinicalInformation_EN": clinical,
            "Technique_EN": tech,
            "Findings_EN": fnd,
            "Impressions_EN": imp,
        },
        "meta": {
            "VolumeName": name,
            "RescaleSlope": SLOPE,
            "RescaleIntercept": INTERCEPT,
            "XYSpacing": f"[{spacing[1]:.6g}, {spacing[2]:.6g}]",
            "ZSpacing": f"{spacing[0]:.6g}",
            "Findings": json.dumps(findings, sort_keys=True),
        },
        "labels": {"VolumeName": name, **labels},
    }


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """Write a CSV atomically (temp file in the same directory, then os.replace)."""
    with atomic_write(path) as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


def generate_phantom(
    out_dir: str | os.PathLike,
    n: int,
    size: tuple[int, int, int] = (32, 64, 64),
    seed: int = 0,
    valid_fraction: float = 0.2,
    prevalence: float = 0.3,
    workers: int = 1,
    lr_factor: int = 2,
) -> dict:
    """Write n phantom volumes (train + valid) in CT-RATE's layout under out_dir; return a summary."""
    if n < 2:
        raise ValueError(f"phantom needs n >= 2 (one train and one valid volume), got {n}")
    if len(size) != 3 or min(size) < 8:
        raise ValueError(f"phantom size must be D,H,W each >= 8, got {size}")
    out = Path(out_dir)
    n_valid = min(n - 1, max(1, round(n * valid_fraction)))
    jobs = [
        (str(out), i, "train" if i < n - n_valid else "valid", tuple(size), 0, seed, prevalence, lr_factor)
        for i in range(n)
    ]
    jobs = [
        (o, i, sp, sz, (i + 1 if sp == "train" else i - (n - n_valid) + 1), sd, p, f)
        for o, i, sp, sz, _, sd, p, f in jobs
    ]
    if workers > 1:
        # spawn: the caller (the trainer) may hold torch / communication threads that fork would copy.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_one, jobs, chunksize=4))
    else:
        rows = [_one(j) for j in jobs]
    for split in ("train", "valid"):
        part = [r for r in rows if r["split"] == split]
        _write_csv(
            out / "radiology_text_reports" / f"{split}_reports.csv",
            REPORT_COLUMNS,
            [r["report"] for r in part],
        )
        _write_csv(out / "metadata" / f"{split}_metadata.csv", METADATA_COLUMNS, [r["meta"] for r in part])
        _write_csv(
            out / "multi_abnormality_labels" / f"{split}_predicted_labels.csv",
            ("VolumeName", *CLASSES),
            [r["labels"] for r in part],
        )
    counts = {c: sum(r["labels"][c] for r in rows) for c in PHANTOM_CLASSES}
    return {
        "out": str(out),
        "n": n,
        "train": n - n_valid,
        "valid": n_valid,
        "size": list(size),
        "positives": counts,
        "lr_factor": lr_factor,
        "version": PHANTOM_VERSION,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI: generate a phantom set and print its summary as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--size", type=parse_size, default=(32, 64, 64))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--valid-fraction", type=float, default=0.2)
    p.add_argument(
        "--prevalence", type=float, default=0.3, help="probability of each finding kind per volume"
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--lr-factor", type=int, default=2, help="HR/LR ratio for the findings' lr_fill")
    a = p.parse_args(argv)
    summary = generate_phantom(
        a.out, a.n, a.size, a.seed, a.valid_fraction, a.prevalence, a.workers, a.lr_factor
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
