"""Mean squared error."""

from __future__ import annotations

import torch
from torch import nn


class MSELoss:
    """Mean squared error of scores (or vectors) against their targets."""

    def __call__(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(scores, targets)
