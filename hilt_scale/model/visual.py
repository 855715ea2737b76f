"""The visual path: volumes -> the ViT's input channels (window, calcium), the LR view, the ViT's HR
and LR token features, and the connector's visual tokens. Shared by the report model, the vision
warm-up and the vision probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hilt_scale.model.config import CALCIUM_WINDOW, ModelConfig, Size3, VisionConfig, grid
from hilt_scale.model.vit3d import ViT3D
from shards.schema import HU_WINDOW


def build_vision(cfg: ModelConfig) -> ViT3D:
    """The ViT: 3D patches on the HR grid, or for the ``2d`` variant ``patch_2d`` x ``patch_2d``
    patches spanning all HR slices (the HR volume as a 2D image with D channels)."""
    res = cfg.resolution
    if cfg.connector.kind == "2d":
        side = cfg.connector.patch_2d
        patch: Size3 = (res.hr_size[0], side, side)
        return ViT3D(cfg.vision, patch, grid(res.hr_size, patch))
    return ViT3D(cfg.vision, res.patch_size, grid(res.hr_size, res.patch_size))


def to_unit_range(hr: torch.Tensor, window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """Float volume in [0, 1]: uint8 / 255 (windowed to HU_WINDOW when written), int16 HU windowed
    to ``window`` (default the paper's [-1000, 200]), floats unchanged."""
    if hr.dtype == torch.uint8:
        if tuple(window) != tuple(HU_WINDOW):
            raise ValueError(
                f"vision.hu_window={tuple(window)} needs HU input: uint8 shards are windowed to "
                f"{HU_WINDOW} when written; write int16 shards (python -m shards.write --dtype int16)"
            )
        return hr.float() / 255.0
    if hr.dtype in (torch.int16, torch.int32):
        lo, hi = window
        return (hr.float().clamp(lo, hi) - lo) / (hi - lo)
    return hr.float()


def lr_view(x: torch.Tensor, lr_size: Size3, mode: str = "area") -> torch.Tensor:
    """The LR view of a [B, C, D, H, W] volume: "area" = average pooling to ``lr_size`` (adaptive,
    anti-aliased), "trilinear" = the paper's F.interpolate (align_corners False)."""
    if mode == "area":
        return F.adaptive_avg_pool3d(x, tuple(lr_size))
    if mode == "trilinear":
        return F.interpolate(x, size=tuple(lr_size), mode="trilinear", align_corners=False)
    raise ValueError(f"resolution.lr_view={mode!r}; expected 'area' or 'trilinear'")


def vision_input(hr: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """The ViT's input channels before its own (``vision.input``): [B, 1, D, H, W] volumes (uint8,
    int16 HU or float) -> the window centred to [-1, 1], plus the calcium window with
    ``window+contrast+calcium`` (HU input only)."""
    # Centre to [-1, 1]: the ViT's LayerNorms remove a token's scale, so with inputs in [0, 1] a
    # dark (air, lung) and a bright (fluid, tissue) uniform patch look alike; centred, they
    # point opposite ways. Measured on the phantom: a linear probe on the ViT learns the
    # findings with centred input and stays at the majority class with [0, 1] input.
    x = to_unit_range(hr, cfg.hu_window) * 2.0 - 1.0
    if cfg.input != "window+contrast+calcium":
        return x
    if hr.dtype not in (torch.int16, torch.int32):
        raise ValueError(
            f"vision.input=window+contrast+calcium needs HU input, got {hr.dtype} volumes: uint8 "
            f"shards are windowed to {HU_WINDOW} when written; write int16 shards "
            "(python -m shards.write --dtype int16)"
        )
    return torch.cat([x, to_unit_range(hr, CALCIUM_WINDOW) * 2.0 - 1.0], dim=1)


def vision_features(
    vision: ViT3D, connector: nn.Module, hr: torch.Tensor, lr_size: Size3, lr_mode: str = "area"
) -> tuple[torch.Tensor | None, torch.Tensor | None, Size3]:
    """The ViT's HR and LR token features of [B, 1, D, H, W] (or [B, D, H, W]) volumes, and the HR
    grid: the connector's inputs. Which passes run depends on the connector (``needs_hr`` /
    ``needs_lr``; None for a pass it skips). The LR view is the HR volume resized to ``lr_size``
    (``lr_view``, mode ``lr_mode``): HU volumes in HU, then windowed (``vision_input``)."""
    device = vision.patch_embed.weight.device
    if hr.dim() == 4:
        hr = hr.unsqueeze(1)
    if hr.dim() != 5 or hr.shape[1] != 1:
        raise ValueError(f"hr must be [B, 1, D, H, W] (or [B, D, H, W]), got shape {tuple(hr.shape)}")
    hr = hr.to(device, non_blocking=True)
    x = vision_input(hr, vision.cfg)
    z_hr = z_lr = None
    hr_grid = vision.grid_of(x.shape[-3:]) if connector.needs_hr else (0, 0, 0)
    if connector.needs_lr:
        if hr.dtype in (torch.int16, torch.int32):
            # HU first, as a scanner's coarser voxel averages HU and the windows clip after that.
            # Windowing first would keep a lone 800 HU spot in 40 HU tissue at 1/8 of its calcium-
            # window value in the LR view (0.10, on a background of exactly 0), where the averaged
            # HU (135) is at the window's floor (0.006): the LR view would show what it cannot.
            lr = vision_input(lr_view(hr.float(), lr_size, lr_mode).round().to(hr.dtype), vision.cfg)
        else:  # uint8 (windowed when written) or float: the window is linear here, order is moot
            lr = lr_view(x, lr_size, lr_mode)
        z_lr = vision(lr)
    if connector.needs_hr:
        z_hr = vision(x)
    return z_hr, z_lr, hr_grid


def encode_volumes(
    vision: ViT3D, connector: nn.Module, lr_size: Size3, hr: torch.Tensor, lr_mode: str = "area"
) -> torch.Tensor:
    """The visual path alone: volumes -> the connector's tokens (``vision_features`` then the
    connector). Used by the model and the vision probe."""
    return connector(*vision_features(vision, connector, hr, lr_size, lr_mode))
