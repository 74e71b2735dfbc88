"""Multiple-negatives ranking: each query against every title of its batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MNRLLoss:
    """Cross-entropy of query ``i`` over the batch's titles, title ``i`` being its positive; titles masked by
    ``other_positives`` (another positive of the same query) are left out. Cosines are multiplied by ``scale``."""

    scale: float

    def __call__(self, queries: torch.Tensor, titles: torch.Tensor, other_positives: torch.Tensor) -> torch.Tensor:
        logits = (self.scale * queries @ titles.T).masked_fill(other_positives, float("-inf"))
        return nn.functional.cross_entropy(logits, torch.arange(len(queries), device=logits.device))
