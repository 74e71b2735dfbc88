"""Distillation: a student's vectors onto a teacher's, and (optionally) the batch's similarities too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DistillationLoss:
    """``vectors`` (e.g. :class:`~matching.training.losses.CosineDistanceLoss`) between the student's and the
    teacher's vectors, plus ``similarity`` x the MSE between their in-batch similarity matrices, which asks the
    student to keep the teacher's ranking, not only each vector's direction."""

    vectors: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    similarity: float = 0.0

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        value = self.vectors(student, teacher)
        if self.similarity:
            value = value + self.similarity * nn.functional.mse_loss(student @ student.T, teacher @ teacher.T)
        return value
