"""Linear layers on oneDNN's prepacked bfloat16 weights, for the bulk inference copy on a CPU.

``nn.Linear`` in bfloat16 on a CPU first copies the bias into its output and then multiplies into it, and the
feed-forward's GELU then reads and writes the 4x-wide activations once more: on batches of short titles
(profile of 6,000 generated titles, Xeon with AMX, 2 threads) the linear layers were 45% of the encode and the
GELU 17%. :class:`PackedLinear` multiplies with the weights reordered once into oneDNN's blocked layout, the bias
added in the kernel, and the feed-forward's exact GELU fused into the same kernel. These are the oneDNN ops
torch's own compiler emits for CPU inference (``torch.ops.mkldnn``); :func:`pack_linears` checks them against
``nn.Linear`` on the model's own weights before it swaps anything, and leaves the model as it is where they are
missing or disagree.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# rows the packed layout is chosen for (a title batch has ~4,096 padded tokens); any row count runs on it
_PACK_ROWS = 4096


class PackedLinear(nn.Module):
    """``nn.Linear`` (optionally followed by the exact GELU) on prepacked bfloat16 weights, inference only."""

    def __init__(self, linear: nn.Linear, *, gelu: bool = False) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.out_features = linear.out_features
        self.attr = "gelu" if gelu else "none"
        self.algorithm = "none" if gelu else ""  # oneDNN's name for the exact (erf) GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            rows, self.packed, self.bias, self.attr, [], self.algorithm
        )
        return out.reshape(*x.shape[:-1], self.out_features)


def _exact_gelu(module: nn.Module) -> bool:
    """Whether ``module`` computes the exact (erf) GELU and nothing else."""
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    # transformers' GELUActivation: nn.functional.gelu, exact unless constructed otherwise
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is nn.functional.gelu


def _ops_agree(linear: nn.Linear) -> bool:
    """Whether the packed ops (plain and with the GELU) give ``linear``'s answer on a random batch: in float32
    to 1e-5 (which tells the exact GELU from its tanh approximation, 5e-4 apart there), and in ``linear``'s own
    bfloat16 element by element within two roundings."""
    x = torch.randn(37, linear.in_features, generator=torch.Generator().manual_seed(0))
    wide = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        wide.weight.copy_(linear.weight)
        if linear.bias is not None:
            wide.bias.copy_(linear.bias)
    checks = ((wide, x, 1e-5, 1e-5), (linear, x.to(linear.weight.dtype), 2**-6, 1e-3))
    try:
        for layer, inputs, rtol, atol in checks:
            with torch.no_grad():
                want = nn.functional.linear(inputs, layer.weight, layer.bias).float()
                got = {False: want, True: nn.functional.gelu(want)}
                for gelu, expected in got.items():
                    out = PackedLinear(layer, gelu=gelu)(inputs).float()
                    bound = atol * float(expected.abs().max()) + rtol * expected.abs()
                    if bool(((out - expected).abs() > bound).any()):
                        log.info("oneDNN's packed linear ops disagree with nn.Linear here; the layers stay as they are")
                        return False
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        log.info("oneDNN's packed linear ops are not usable here (%s)", exc)
        return False
    return True


def pack_linears(model: nn.Module) -> int:
    """Swap, in place, the bfloat16 CPU ``nn.Linear`` layers of ``model`` for :class:`PackedLinear`, fusing each
    feed-forward's exact GELU (a module with ``dense`` and ``intermediate_act_fn``, as in BERT-family models)
    into its first layer. Returns how many layers were swapped (0 where the ops are unusable)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or any(m.weight.dtype != torch.bfloat16 or m.weight.device.type != "cpu" for m in linears):
        return 0
    if not _ops_agree(linears[0]):
        return 0
    swapped = 0
    for parent in list(model.modules()):
        act = getattr(parent, "intermediate_act_fn", None)
        dense = getattr(parent, "dense", None)
        if isinstance(dense, nn.Linear) and isinstance(act, nn.Module) and _exact_gelu(act):
            parent.dense = PackedLinear(dense, gelu=True)
            parent.intermediate_act_fn = nn.Identity()  # applied by the kernel above
            swapped += 1
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
                swapped += 1
    return swapped
