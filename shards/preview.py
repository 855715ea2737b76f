"""PNG of the middle axial, coronal and sagittal slices of a volume in the canonical orientation.

This is how a user checks that a new dataset came in the right way up: the axial view must show
anterior at the top and the patient's right on the image's left, coronal and sagittal views the
head at the top. Input: a NIfTI file (run through ingestion) or a shard set (one sample by key).

Usage: python -m shards.preview INPUT [--key KEY] [--hr-size D,H,W] --out PNG
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shards.ingest import Record, load_canonical, preprocess  # noqa: E402
from shards.io import atomic_write  # noqa: E402
from shards.schema import HU_WINDOW, parse_size  # noqa: E402


def _views(arr: np.ndarray, spacing: tuple[float, float, float]):
    """(title, slice, aspect, edge labels top/bottom/left/right) for the three middle slices."""
    d, h, w = arr.shape
    sz, sy, sx = spacing
    return [
        ("axial", arr[d // 2], sy / sx, ("A", "P", "R", "L")),
        ("coronal", arr[:, h // 2, :], sz / sx, ("S", "I", "R", "L")),
        ("sagittal", arr[:, :, w // 2], sz / sy, ("S", "I", "A", "P")),
    ]


def save_preview(
    arr: np.ndarray, spacing: tuple[float, float, float], out: str | Path, title: str = ""
) -> Path:
    """Write the three middle slices of a canonical (D, H, W) array to a PNG, atomically."""
    out = Path(out)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.5))
    vmin, vmax = (0, 255) if arr.dtype == np.uint8 else HU_WINDOW
    for ax, (name, sl, aspect, (top, bottom, left, right)) in zip(axes, _views(arr, spacing)):
        ax.imshow(sl, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        ax.set_title(f"{name} (middle slice)")
        ax.set_xticks([])
        ax.set_yticks([])
        kw = {"transform": ax.transAxes, "color": "yellow", "fontsize": 12, "fontweight": "bold"}
        ax.text(0.5, 0.97, top, ha="center", va="top", **kw)
        ax.text(0.5, 0.03, bottom, ha="center", va="bottom", **kw)
        ax.text(0.02, 0.5, left, ha="left", va="center", **kw)
        ax.text(0.98, 0.5, right, ha="right", va="center", **kw)
    fig.suptitle(title or f"shape {arr.shape}, spacing {tuple(round(s, 2) for s in spacing)} mm")
    fig.tight_layout()
    with atomic_write(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80)
    plt.close(fig)
    return out


def load_for_preview(src: str | Path, key: str | None = None, hr_size: tuple[int, int, int] | None = None):
    """(array, spacing, title) from a NIfTI file or a shard set directory."""
    src = Path(src)
    if src.is_dir():
        from shards.read import open_shard_set

        shard_set = open_shard_set(src)
        sample = shard_set.load(key or shard_set.keys()[0])
        return sample["hr"], tuple(sample["meta"]["spacing"]), f"{src.name}: {sample['key']}"
    hu, spacing = load_canonical(Record(src.name, src, "", "", "nifti"))
    if hr_size is not None:
        arr, spacing = preprocess(hu, spacing, hr_size, "uint8")
        return arr, spacing, f"{src.name} -> {hr_size}"
    return hu, spacing, src.name


def main(argv: list[str] | None = None) -> None:
    """CLI: write the preview PNG and print its path."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", help="a .nii/.nii.gz file or a shard set directory")
    p.add_argument("--key", help="sample key (shard set input); default: the first sample")
    p.add_argument("--hr-size", type=parse_size, help="preprocess a NIfTI to this D,H,W first")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    arr, spacing, title = load_for_preview(a.input, a.key, a.hr_size)
    print(save_preview(arr, spacing, a.out, title))


if __name__ == "__main__":
    main()
