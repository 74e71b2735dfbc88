"""CoSENT: pairwise ranking of graded labels inside a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CoSENTLoss:
    """log(1 + sum over pairs with label_i > label_j of exp((s_j - s_i) / T))."""

    temperature: float

    def __call__(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        diff = (scores[None, :] - scores[:, None]) / self.temperature  # diff[i, j] = (s_j - s_i) / T
        ordered = labels[:, None] > labels[None, :]
        diff = diff.masked_fill(~ordered, float("-inf"))
        flat = torch.cat([torch.zeros(1, dtype=diff.dtype, device=diff.device), diff.reshape(-1)])
        return torch.logsumexp(flat, dim=0)
