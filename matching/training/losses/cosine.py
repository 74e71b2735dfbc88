"""Cosine distance between two sets of L2-normalised vectors."""

from __future__ import annotations

import torch


class CosineDistanceLoss:
    """Mean of ``1 - cos(a_i, b_i)`` over the rows (the vectors are unit length: the cosine is the dot product)."""

    def __call__(self, vectors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (1.0 - (vectors * targets).sum(dim=-1)).mean()
