"""3D Vision Transformer that encodes both the HR volume and its LR view with one set of weights.

Position embeddings are learned on the HR token grid and resized (trilinear) to any other grid,
as the HILT paper does for the LR view; attention uses torch SDPA. Options beyond the paper's ViT
(``VisionConfig``): a local-contrast input channel, a conv stem, no final LayerNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hilt_scale.model.config import CALCIUM_HIGHPASS_GAIN, VISION_INPUTS, Size3, VisionConfig, stem_filters


class Attention(nn.Module):
    """Multi-head self-attention over a token sequence via scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def patchify(volume: torch.Tensor, patch_size: Size3) -> torch.Tensor:
    """[B, C, D, H, W] -> [B, N, C*pd*ph*pw]: non-overlapping patches in (d, h, w) raster order."""
    b, c, d, h, w = volume.shape
    pd, ph, pw = patch_size
    x = volume.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (d // pd) * (h // ph) * (w // pw), c * pd * ph * pw)


# A voxel's 3x5x5 (D, H, W) neighbourhood as avg_pool3d arguments, cut at the volume's borders
# (no padding counted): the local mean of local_contrast and of the calcium high-pass.
NEIGHBOURHOOD = dict(kernel_size=(3, 5, 5), stride=1, padding=(1, 2, 2), count_include_pad=False)


def local_contrast(unit: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """(voxel - mean of its 3x5x5 (D, H, W) neighbourhood) / (neighbourhood std + eps), per channel
    of a [B, C, D, H, W] volume; the neighbourhood is cut at the borders (no padding counted)."""
    unit = unit - unit.mean(dim=(2, 3, 4), keepdim=True)  # no change but less float32 cancellation
    mean = F.avg_pool3d(unit, **NEIGHBOURHOOD)
    var = (F.avg_pool3d(unit * unit, **NEIGHBOURHOOD) - mean * mean).clamp_min(0.0)
    return (unit - mean) / (var.sqrt() + eps)


def input_channels(x: torch.Tensor, mode: str, calcium: str = "window") -> torch.Tensor:
    """The ViT's input from a volume centred to [-1, 1]: [B, 1, D, H, W] for "window" (returned as
    it is) and "window+contrast" (plus the local contrast of its [0, 1] form); [B, 2, D, H, W] =
    (window, calcium window) for "window+contrast+calcium" -> (window, its local contrast, calcium
    in [0, 1]: no calcium is 0, as the stem's zero padding, so the volume's border is no edge).
    ``calcium="highpass"``: the calcium in [0, 1] minus its local mean, times CALCIUM_HIGHPASS_GAIN
    (a linear map, so the LR view's average dilutes a spot as much as before)."""
    if mode == "window":
        return x
    if mode == "window+contrast":
        return torch.cat([x, local_contrast((x + 1.0) * 0.5)], dim=1)
    if mode == "window+contrast+calcium":
        spots = (x[:, 1:] + 1.0) * 0.5
        if calcium == "highpass":
            spots = (spots - F.avg_pool3d(spots, **NEIGHBOURHOOD)) * CALCIUM_HIGHPASS_GAIN
        return torch.cat([x[:, :1], local_contrast((x[:, :1] + 1.0) * 0.5), spots], dim=1)
    raise ValueError(f"vision.input={mode!r}; expected one of {tuple(VISION_INPUTS)}")


class ConvStem(nn.Module):
    """Conv3d 3x3x3 (padding 1) + ReLU at voxel resolution, then the max of each channel over each
    patch: [B, C_in, D, H, W] -> [B, N, channels], a one-voxel finding survives as a patch's max.

    With ``calcium_channels`` the last input channel (calcium) has that many filters of its own,
    after the ``channels`` of the others. In a shared filter the spot is rarely a patch's maximum
    (edges in the other channels are), and max pooling passes gradient to the maximum alone, so
    the filters never learn it; a calcium-only filter's maximum is the spot (round 7, SWEEPS.md)."""

    def __init__(self, in_channels: int, channels: int, patch_size: Size3, calcium_channels: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels - (calcium_channels > 0), channels, kernel_size=3, padding=1)
        self.calcium = nn.Conv3d(1, calcium_channels, kernel_size=3, padding=1) if calcium_channels else None
        self.patch_size = tuple(patch_size)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        # max(ReLU(x)) = ReLU(max(x)) (ReLU is monotonic), so the ReLU runs on the patch maxima
        # alone; channels-last spares the CPU convolution two layout copies. Same values and
        # gradients as conv -> ReLU -> max, ~2.7x faster forward + backward (cpu-tiny, batch 4).
        x = volume.contiguous(memory_format=torch.channels_last_3d)
        if self.calcium is None:
            x = self.conv(x)
        else:
            # Both filter sets as one convolution over all channels, the weights they must not see
            # held at zero (0 * x adds exactly nothing): ~1.6x faster forward + backward than two
            # convolutions and a join of their voxel-sized maps (cpu-tiny, batch 4, one thread).
            shared, calcium = self.conv.weight, self.calcium.weight  # [out, in, 3, 3, 3]
            no_kernel_pad = (0, 0) * 3  # F.pad's pairs run from the last dimension: kernel, then in
            weight = torch.cat(
                [F.pad(shared, (*no_kernel_pad, 0, 1)), F.pad(calcium, (*no_kernel_pad, shared.shape[1], 0))]
            )
            x = F.conv3d(x, weight, torch.cat([self.conv.bias, self.calcium.bias]), padding=1)
        return F.relu(F.max_pool3d(x, self.patch_size)).flatten(2).transpose(1, 2)


class ViT3D(nn.Module):
    """Patchify a [B, 1, D, H, W] volume centred to [-1, 1] ([B, 2, ...] with the calcium channel)
    into tokens and encode them; returns [B, N, width]. ``cfg.input`` adds input channels,
    ``cfg.stem`` picks the token embedding."""

    def __init__(self, cfg: VisionConfig, patch_size: Size3, hr_grid: Size3) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = tuple(patch_size)
        self.hr_grid = tuple(hr_grid)
        self.width = cfg.width
        in_channels = VISION_INPUTS[cfg.input]
        if cfg.stem == "conv":
            shared, calcium = stem_filters(cfg)
            self.stem = ConvStem(in_channels, shared, self.patch_size, calcium)
            self.patch_embed = nn.Linear(shared + calcium, cfg.width)
        elif cfg.stem == "patch":
            self.stem = None
            # A linear map of each flattened patch: the same function as a Conv3d with stride =
            # kernel, ~70x faster forward + backward on CPU (measured at batch 4, vit-micro, cpu-tiny).
            self.patch_embed = nn.Linear(in_channels * math.prod(patch_size), cfg.width)
        else:
            raise ValueError(f"vision.stem={cfg.stem!r}; expected 'patch' or 'conv'")
        n = hr_grid[0] * hr_grid[1] * hr_grid[2]
        self.pos_embed = nn.Parameter(torch.zeros(1, n, cfg.width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width) if cfg.final_norm else nn.Identity()

    def grid_of(self, size: tuple[int, ...]) -> Size3:
        """Token grid for a volume of spatial ``size`` (D, H, W)."""
        bad = [s % p for s, p in zip(size, self.patch_size)]
        if any(bad):
            raise ValueError(f"volume size {tuple(size)} is not a multiple of patch size {self.patch_size}")
        return tuple(s // p for s, p in zip(size, self.patch_size))  # type: ignore[return-value]

    def pos_embed_for(self, token_grid: Size3) -> torch.Tensor:
        """Position embeddings for ``token_grid``: the HR table, trilinearly resized when it differs."""
        if tuple(token_grid) == self.hr_grid:
            return self.pos_embed
        table = self.pos_embed.transpose(1, 2).reshape(1, self.width, *self.hr_grid)
        table = F.interpolate(table.float(), size=tuple(token_grid), mode="trilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2).to(self.pos_embed.dtype)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        token_grid = self.grid_of(volume.shape[-3:])
        x = input_channels(volume.to(self.patch_embed.weight.dtype), self.cfg.input, self.cfg.calcium)
        x = self.patch_embed(self.stem(x) if self.stem is not None else patchify(x, self.patch_size))
        x = x + self.pos_embed_for(token_grid)
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)
