"""The finding side of the report model: the 18 CT-RATE labels as training targets, the finding
head's readout of the visual tokens, and the finding tokens that carry its reading into the LLM
(``ModelConfig.findings_loss`` / ``finding_tokens``, docs/MODEL.md)."""

from __future__ import annotations

import torch
from torch import nn

from hilt_scale.model.config import FINDING_READOUTS
from shards.schema import CLASSES


def max_mean(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, C] tokens -> [B, 2C]: the max over tokens (a small finding lifts one token) beside the
    mean (a global change lifts all): the input of the ``max+mean`` finding head."""
    return torch.cat([tokens.amax(1), tokens.mean(1)], dim=-1)


class FindingHead(nn.Linear):
    """[B, N, C] visual tokens -> [B, K] finding logits; the weight is [K, 2C] = (max part, mean part).

    ``max+mean``: W_max max_n(x_n) + W_mean mean_n(x_n) + b, the max taken per feature, then mixed.
    ``class-max``: max_n(W_max x_n) + W_mean mean_n(x_n) + b, each class's score taken on every
    token, then its max (multiple-instance pooling). A one-voxel finding lifts one token along
    some direction; per feature, that lift is the maximum only where no other token (an edge, the
    body's border) is higher in the same feature, so the max+mean head sees it only once the
    encoder has given it features of its own. The class score's maximum is the token the class
    points at in any basis. Same parameters, so either readout loads the other's weights."""

    def __init__(self, width: int, classes: int, readout: str = "max+mean") -> None:
        if readout not in FINDING_READOUTS:
            raise ValueError(f"finding_readout={readout!r}; expected one of {FINDING_READOUTS}")
        super().__init__(2 * width, classes)
        self.readout = readout

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.weight.dtype)
        if self.readout == "max+mean":
            return super().forward(max_mean(tokens))
        w_max, w_mean = self.weight.split(tokens.shape[-1], dim=1)
        return (tokens @ w_max.T).amax(1) + tokens.mean(1) @ w_mean.T + self.bias


def finding_targets(meta: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 18] 0/1 targets from each sample's CT-RATE labels (``shards.schema.CLASSES`` order) and
    [B] whether the sample has all 18 (a sample without labels has all-zero targets, not known)."""
    targets, known = [], []
    for m in meta:
        labels = m.get("labels") or {}
        has = all(c in labels for c in CLASSES)
        known.append(has)
        targets.append([float(labels[c]) if has else 0.0 for c in CLASSES])
    return torch.tensor(targets, dtype=torch.float32).reshape(len(meta), len(CLASSES)), torch.tensor(known)



class FindingTokens(nn.Module):
    """The finding tokens (ModelConfig.finding_tokens): token k = p_k * present_k + (1 - p_k) *
    absent_k for [B, K] probabilities p (detached), two learned embeddings per class. A module
    of its own, so ZeRO-3 gathers its weights when it runs, in generation too."""

    def __init__(self, classes: int, width: int) -> None:
        super().__init__()
        self.present = nn.Parameter(torch.randn(classes, width) * 0.02)
        self.absent = nn.Parameter(torch.randn(classes, width) * 0.02)

    def forward(self, prob: torch.Tensor) -> torch.Tensor:
        p = prob.detach().to(self.present.dtype)[..., None]  # [B, K, 1]
        return p * self.present + (1 - p) * self.absent
