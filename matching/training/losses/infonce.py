"""InfoNCE: each row's candidates under a softmax, the positives as the target distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InfoNCELoss:
    """Cross-entropy of ``softmax(scores / temperature)`` against ``target`` (a row's positives share its mass).

    ``mask`` (False: no candidate there) leaves padded slots out; ``weight`` weighs the rows (default: a plain
    mean)."""

    temperature: float

    def __call__(
        self,
        scores: torch.Tensor,
        target: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = scores / self.temperature
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        log_p = torch.log_softmax(logits, dim=-1)
        # where, not a product: a masked slot's log-probability is -inf and 0 * -inf is NaN
        per_row = -torch.where(target > 0, target * log_p, 0.0).sum(dim=-1)
        return per_row.mean() if weight is None else (per_row * weight).sum() / weight.sum()
