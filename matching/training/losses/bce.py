"""Binary cross-entropy on a learned affine map of the score."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class AffineBCELoss:
    """BCE of ``a * score + b`` against ``label > 0``. A cosine-like score is no calibrated logit, so the map is
    learned with the model (its parameters go to the optimiser); it starts at ``(score - 0.5) / temperature``."""

    def __init__(self, temperature: float) -> None:
        self.affine = nn.Linear(1, 1)
        nn.init.constant_(self.affine.weight, 1.0 / temperature)
        nn.init.constant_(self.affine.bias, -0.5 / temperature)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.affine.parameters()

    def __call__(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.affine(scores.unsqueeze(-1)).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, (labels > 0).float())
