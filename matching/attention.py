"""Self-attention for batches of short texts on a CPU, registered with transformers under :data:`NAME`.

torch's scaled-dot-product attention on a CPU runs a flash kernel tiled for long sequences: on batches of short
titles it was a third of the whole encode (profile of 3,000 generated titles, ~14 tokens, bfloat16, Xeon with
AMX, 2 threads: 380 of 1,159 ms). Below :data:`SHORT_MAX_TOKENS` tokens this module multiplies the scores out
instead and normalises them in float32 (bfloat16's softmax kernel was 2.7x slower than float32's on these
shapes); from that width on, and where a model has fewer key than query heads, it calls torch's kernel as before.

The scores themselves come out of a bfloat16 matmul (torch has no bfloat16 matmul with a float32 result on a CPU;
one in float32 was 3.3x slower): rounded where torch's kernel keeps them in float32. Measured on 1,000 titles
against the ``exact`` preset, the mean 1 - cosine is ~4% higher than with torch's kernel for all-MiniLM-L6-v2 and
~24% higher for multilingual-e5-small (2.64e-5 against 2.13e-5); the smallest cosine was the same or higher.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

NAME = "matching-short"
# widths below this take the multiplied-out path. Measured per attention call on the widths a title batch has
# (4,096 padded tokens a batch, 12 heads of 32, bfloat16, 2 threads): 8 tokens 3.6 against 6.7 ms, 16 tokens 1.4
# against 2.6, 28 tokens 2.1 against 4.7; at 32 torch's kernel wins (2.1 against 3.7 ms), and from 40 on by 2-5x
# (its scores are never written out whole).
SHORT_MAX_TOKENS = 32
# torch's float32 softmax over a last dimension narrower than this runs scalar code (7-8 ns an element against
# 0.4-0.8 from 16 on; the same shapes): the narrow rows are normalised by hand
_VECTOR_WIDTH = 16
# transformers' log level is process-wide: one switch at a time sets it aside and puts it back
_QUIET = threading.Lock()


def softmax_last(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of a float32 tensor, in place where the narrow path runs."""
    if scores.shape[-1] >= _VECTOR_WIDTH:
        return torch.softmax(scores, dim=-1)
    scores = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True))


def short_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``(batch, heads, tokens, head_dim)`` query, key and value and an
    additive (or boolean: True = attend) mask -> ``(batch, tokens, heads, head_dim)`` and no weights."""
    if module.training and dropout > 0:
        raise RuntimeError(f"attention {NAME!r} is for inference only; train with the model's own attention")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.shape[-2] >= SHORT_MAX_TOKENS or key.shape[-2] != query.shape[-2] or key.shape[1] != query.shape[1]:
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1]
        )
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores = scores.add_(attention_mask)
    weights = softmax_last(scores).to(value.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def _register() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:  # pragma: no cover - transformers before the attention interface
        return False
    AttentionInterface.register(NAME, short_attention)
    # the additive float mask, as for the model's eager attention
    AttentionMaskInterface.register(NAME, eager_mask)
    return True


def use_short_attention(model: nn.Module) -> bool:
    """Switch ``model`` (in place) to :func:`short_attention`; False (model unchanged) where its architecture
    does not take a registered attention function."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None or not _register():
        return False
    from transformers.utils import logging as hf_logging

    with _QUIET:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # a refusal is a warning there; logged here
        try:
            setter(NAME)
        except (ValueError, TypeError, NotImplementedError) as exc:
            log.info("keeping the model's own attention (%s)", exc)
            return False
        finally:
            hf_logging.set_verbosity(verbosity)
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME
