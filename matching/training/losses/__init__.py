"""The training objectives, one per module (sentence-transformers keeps its ``losses/`` the same way). Each is a
small callable on tensors; the trainers compute the scores and pick the loss."""

from __future__ import annotations

from typing import Protocol

import torch

from matching.training.losses.bce import AffineBCELoss
from matching.training.losses.cosent import CoSENTLoss
from matching.training.losses.cosine import CosineDistanceLoss
from matching.training.losses.distillation import DistillationLoss
from matching.training.losses.infonce import InfoNCELoss
from matching.training.losses.mnrl import MNRLLoss
from matching.training.losses.mse import MSELoss


class PairLoss(Protocol):
    """A loss on one score per pair against its label (or target)."""

    def __call__(self, scores: torch.Tensor, labels: torch.Tensor, /) -> torch.Tensor: ...


__all__ = [
    "AffineBCELoss",
    "CoSENTLoss",
    "CosineDistanceLoss",
    "DistillationLoss",
    "InfoNCELoss",
    "MNRLLoss",
    "MSELoss",
    "PairLoss",
]
