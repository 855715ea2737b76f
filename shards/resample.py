"""Window, resample and quantise one CT volume plane by plane, with bounded memory.

The resampling is trilinear with ``align_corners=False`` (the same sample positions as
``torch.nn.functional.interpolate(mode="trilinear")``), done separably: each output axial plane
is the linear blend of two source planes (clipped to the HU window on the way), then resized in
H and W, centre cropped or padded with air and quantised straight into the output array. So a
volume costs its source array (any dtype, any strides: a flipped or transposed view is never
copied whole) plus the output and a few planes: never a whole-volume float64, float32 or
transposed copy (docs/DATA.md states the measured peak).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, weight of the upper) of each output position along one axis.

    The sample position of output i is ``(i + 0.5) * n_in / n_out - 0.5``, clamped at 0 (torch's
    ``align_corners=False`` rule for linear interpolation).
    """
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _resize_plane(p: np.ndarray, h: int, w: int) -> np.ndarray:
    """Linear resize of a float32 (H, W) plane to (h, w)."""
    if p.shape[0] != h:
        lo, hi, t = axis_weights(p.shape[0], h)
        p = p[lo] * (1 - t)[:, None] + p[hi] * t[:, None]
    if p.shape[1] != w:
        lo, hi, t = axis_weights(p.shape[1], w)
        p = p[:, lo] * (1 - t) + p[:, hi] * t
    return p


def _centre(n: int, m: int) -> tuple[slice, slice]:
    """(source slice, target slice) of a centre crop (n >= m) or centre pad (n < m) of n onto m."""
    if n >= m:
        a = (n - m) // 2
        return slice(a, a + m), slice(0, m)
    a = (m - n) // 2
    return slice(0, n), slice(a, a + n)


def resampled_planes(
    src: np.ndarray,
    shape: tuple[int, int, int],
    window: tuple[float, float],
    grid: tuple[int, int, int] | None = None,
    fill: float | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(output index, float32 plane) of ``src`` clipped to ``window``, resized to ``shape`` and
    centre cropped/padded (with ``fill``, default the window's low end) to ``grid`` (default ``shape``).

    Only the planes that land inside the grid are computed; grid planes not yielded are air.
    """
    grid = tuple(grid or shape)
    lo_v, hi_v = window
    cache: dict[int, np.ndarray] = {}

    def plane(k: int) -> np.ndarray:
        if k not in cache:
            if len(cache) > 1:  # planes are asked for in increasing order: keep the last two
                del cache[min(cache)]
            cache[k] = np.clip(np.asarray(src[k], dtype=np.float32), lo_v, hi_v)
        return cache[k]

    lo, hi, t = axis_weights(src.shape[0], shape[0])
    d_src, d_dst = _centre(shape[0], grid[0])
    (h_src, h_dst), (w_src, w_dst) = _centre(shape[1], grid[1]), _centre(shape[2], grid[2])
    for k, d in zip(range(d_src.start, d_src.stop), range(d_dst.start, d_dst.stop)):
        p = plane(int(lo[k]))
        if hi[k] != lo[k] and t[k] != 0:
            p = p * (1 - t[k]) + plane(int(hi[k])) * t[k]
        p = _resize_plane(p, shape[1], shape[2])
        out = np.full(grid[1:], lo_v if fill is None else fill, dtype=np.float32)
        out[h_dst, w_dst] = p[h_src, w_src]
        yield d, out
