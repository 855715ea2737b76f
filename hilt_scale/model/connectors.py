"""Connectors: how ViT tokens become the LLM's visual tokens, HILT and the paper's ablations.

- ``hilt``: the LR tokens query the HR tokens, ``Z = F(Z_LR + softmax(Z_LR Z_HR^T s) Z_HR)``; the
  LLM gets one token per LR token whatever the HR size (the paper's method).
- ``random-queries``: N' learned queries in place of Z_LR (BLIP/Q-Former-style); same attention.
- ``all-tokens``: every HR token is projected into the LLM (RadFM-style); grows with HR size.
- ``pooled``: HR tokens average-pooled on their 3D grid to a fixed grid, then projected (M3D-style).
- ``2d``: the HR volume as a multichannel 2D image (slices = channels), all patch tokens projected
  (LLaVA-1.5 / R2GenGPT-style); the model builds its ViT with a patch spanning the whole depth.
- ``lr-only``: the same 3D ViT on the LR view only, ``Z = F(Z_LR)`` (HILT without the HR attention).
F is a 2-layer MLP projector (LLaVA-1.5's mlp2x_gelu) into the LLM width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hilt_scale.model.attention import (
    attention_entropy,
    attn_scale_value,
    check_heads,
    footprint_attention,
    footprint_mask,
    hilt_attention,
)
from hilt_scale.model.config import ConnectorConfig, Size3


def _count(grid: Size3) -> int:
    return grid[0] * grid[1] * grid[2]


class MLPProjector(nn.Module):
    """``layers`` linear layers (``fc1``..``fcN``) with GELU between, vision width -> LLM width.

    layers=1 is a single linear map (LLaVA-1), 2 is LLaVA-1.5's mlp2x_gelu, 3 adds a hidden layer.
    ``norm`` puts a LayerNorm on the input (``connector.projector_norm``).
    """

    def __init__(
        self, in_width: int, out_width: int, hidden: int = 0, layers: int = 2, norm: bool = False
    ) -> None:
        super().__init__()
        if not 1 <= layers <= 3:
            raise ValueError(f"projector layers={layers}; expected 1, 2 or 3")
        hidden = hidden or out_width
        widths = [in_width] + [hidden] * (layers - 1) + [out_width]
        self.layers = layers
        self.norm = nn.LayerNorm(in_width) if norm else None
        for i in range(layers):
            setattr(self, f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        for i in range(1, self.layers + 1):
            x = getattr(self, f"fc{i}")(F.gelu(x) if i > 1 else x)
        return x


def make_projector(cfg: ConnectorConfig, vision_width: int, llm_width: int) -> MLPProjector:
    """The connector's projector F as configured (``projector_layers``, ``projector_hidden``)."""
    return MLPProjector(
        vision_width, llm_width, cfg.projector_hidden, cfg.projector_layers, cfg.projector_norm
    )


class QueryAttentionConnector(nn.Module):
    """Shared base of HILT and random-queries: queries attend to the HR tokens (residual, no
    projections), then the MLP projector. Subclasses say where the queries come from."""

    needs_hr = True

    def __init__(self, cfg: ConnectorConfig, vision_width: int, llm_width: int) -> None:
        super().__init__()
        self.attn_impl = cfg.attn_impl
        self.heads = check_heads(cfg.heads, vision_width)
        self.keys = cfg.keys
        start = attn_scale_value(cfg.attn_scale, vision_width // cfg.heads)
        # "learned": a trained temperature, scale = exp(log_scale); otherwise a constant float.
        self.log_scale = nn.Parameter(torch.tensor(math.log(start))) if cfg.attn_scale == "learned" else None
        self._scale = start
        # Set by the vision probe: record the attention entropy of each forward in ``last_entropy``.
        self.record_entropy = False
        self.last_entropy: float | None = None
        self.projector = make_projector(cfg, vision_width, llm_width)

    @property
    def scale(self) -> float | torch.Tensor:
        """The softmax scale: a float, or exp(log_scale) (a tensor with grad) when learned."""
        return self._scale if self.log_scale is None else self.log_scale.exp()

    def queries_for(self, z_hr: torch.Tensor, z_lr: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, z_hr: torch.Tensor, z_lr: torch.Tensor | None, hr_grid: Size3) -> torch.Tensor:
        q = self.queries_for(z_hr, z_lr)
        local = self.keys == "footprint"
        if self.record_entropy:
            mask = footprint_mask(hr_grid, q.shape[1], q.device) if local else None
            with torch.no_grad():
                self.last_entropy = float(attention_entropy(q, z_hr, self.scale, self.heads, mask))
        if local:  # block-local: every implementation is the same small softmax over f^3 keys
            return self.projector(footprint_attention(q, z_hr, hr_grid, self.scale, self.heads))
        return self.projector(hilt_attention(q, z_hr, self.scale, self.attn_impl, self.heads))


class HiltConnector(QueryAttentionConnector):
    """HILT: the LR tokens of the same ViT are the queries."""

    needs_lr = True

    def num_tokens(self, hr_grid: Size3, lr_grid: Size3) -> int:
        """Visual tokens given to the LLM: one per LR token, independent of the HR grid."""
        return _count(lr_grid)

    def queries_for(self, z_hr: torch.Tensor, z_lr: torch.Tensor | None) -> torch.Tensor:
        return z_lr


class RandomQueryConnector(QueryAttentionConnector):
    """N' learned queries in place of Z_LR (BLIP-style ablation), same attention and projector."""

    needs_lr = False

    def __init__(self, cfg: ConnectorConfig, vision_width: int, llm_width: int) -> None:
        super().__init__(cfg, vision_width, llm_width)
        self.num_queries = cfg.num_queries  # kept apart: ZeRO-3 empties parameter shapes
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, vision_width) * 0.02)

    def num_tokens(self, hr_grid: Size3, lr_grid: Size3) -> int:
        """Always the number of learned queries."""
        return self.num_queries

    def queries_for(self, z_hr: torch.Tensor, z_lr: torch.Tensor | None) -> torch.Tensor:
        return self.queries.expand(z_hr.shape[0], -1, -1).to(z_hr.dtype)


class TokenProjector(nn.Module):
    """Shared base of the connectors without attention: the tokens of one ViT pass (HR by default,
    LR when ``needs_lr``) through the projector, after the subclass's optional reduction."""

    needs_hr = True
    needs_lr = False

    def __init__(self, cfg: ConnectorConfig, vision_width: int, llm_width: int) -> None:
        super().__init__()
        self.projector = make_projector(cfg, vision_width, llm_width)

    def tokens(self, z_hr: torch.Tensor | None, z_lr: torch.Tensor | None, hr_grid: Size3) -> torch.Tensor:
        return z_hr if self.needs_hr else z_lr

    def forward(self, z_hr: torch.Tensor | None, z_lr: torch.Tensor | None, hr_grid: Size3) -> torch.Tensor:
        return self.projector(self.tokens(z_hr, z_lr, hr_grid))


class AllTokensConnector(TokenProjector):
    """Every HR token through the projector: the LLM sequence grows with the HR volume."""

    def num_tokens(self, hr_grid: Size3, lr_grid: Size3) -> int:
        """One per HR token."""
        return _count(hr_grid)


class Flat2DConnector(AllTokensConnector):
    """Projects the 2D-patch tokens of the HR volume (the ViT's patch spans all D slices, so its
    token grid is (1, H / patch_2d, W / patch_2d)); one token per 2D patch."""


class PooledConnector(TokenProjector):
    """Adaptive average pooling of HR tokens on their (D, H, W) grid, then the projector."""

    def __init__(self, cfg: ConnectorConfig, vision_width: int, llm_width: int) -> None:
        super().__init__(cfg, vision_width, llm_width)
        self.pool_grid = tuple(cfg.pool_grid)

    def num_tokens(self, hr_grid: Size3, lr_grid: Size3) -> int:
        """The fixed pooled grid's size."""
        return _count(self.pool_grid)

    def tokens(self, z_hr: torch.Tensor | None, z_lr: torch.Tensor | None, hr_grid: Size3) -> torch.Tensor:
        b, n, c = z_hr.shape
        x = z_hr.transpose(1, 2).reshape(b, c, *hr_grid)
        return F.adaptive_avg_pool3d(x, self.pool_grid).flatten(2).transpose(1, 2)


class LROnlyConnector(TokenProjector):
    """The same 3D ViT on the LR view only, its tokens through the projector: ``Z = F(Z_LR)``.

    HILT without the HR attention (``Z = F(Z_LR + attn(Z_LR, Z_HR))``), so the two differ only by
    what the HR tokens add; same token count as HILT.
    """

    needs_hr = False
    needs_lr = True

    def num_tokens(self, hr_grid: Size3, lr_grid: Size3) -> int:
        """One per LR token, like HILT."""
        return _count(lr_grid)


CONNECTORS: dict[str, type[nn.Module]] = {
    "hilt": HiltConnector,
    "random-queries": RandomQueryConnector,
    "all-tokens": AllTokensConnector,
    "pooled": PooledConnector,
    "2d": Flat2DConnector,
    "lr-only": LROnlyConnector,
}


def build_connector(cfg: ConnectorConfig, vision_width: int, llm_width: int) -> nn.Module:
    """Instantiate the connector named by ``cfg.kind``."""
    if cfg.kind not in CONNECTORS:
        raise ValueError(f"connector.kind={cfg.kind!r}; expected one of {sorted(CONNECTORS)}")
    return CONNECTORS[cfg.kind](cfg, vision_width, llm_width)
