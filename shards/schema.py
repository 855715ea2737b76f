"""What a shard sample is made of: CT-RATE's 18 abnormality classes, the HU window, volume sizes.

The data side owns CT-RATE's schema; the phantom generator, the labeler and the clinical-efficacy
metrics (in ``hilt_scale``) all read the class list from here, so they speak of the same columns.
"""

from __future__ import annotations

# CT-RATE's 18 abnormality classes, named and ordered exactly as CT-RATE names them.
CLASSES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

# HU window of the preprocessing (paper: clip to [-1000, 200], scale to [0, 1]).
HU_WINDOW: tuple[float, float] = (-1000.0, 200.0)
# HU range int16 shards keep (a CT scanner's 12-bit range): the model windows them itself, so HU
# above the paper's window (calcium, bone, contrast) stays available (vision.hu_window, the
# calcium channel). uint8 shards are windowed to HU_WINDOW when written.
INT16_HU_RANGE: tuple[float, float] = (-1024.0, 3071.0)


def stored_hu_range(dtype: str) -> tuple[float, float]:
    """HU range a shard of ``dtype`` keeps: HU_WINDOW for uint8, INT16_HU_RANGE for int16."""
    return INT16_HU_RANGE if dtype == "int16" else HU_WINDOW


Size3 = tuple[int, int, int]


def parse_size(text: str) -> Size3:
    """Parse ``"D,H,W"`` (or ``DxHxW``) into a (D, H, W) tuple of positive ints."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected three integer sizes D,H,W, got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"expected three positive sizes D,H,W, got {text!r}")
    return size  # type: ignore[return-value]
