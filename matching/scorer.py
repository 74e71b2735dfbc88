"""The small DNN reranker: a residual on the base score (the cosine, or the dense/lexical fusion). Bundles with lexical
features: an MLP over (cos, lexical features) plus a learned per-dimension weighting of q*t; older bundles: an MLP
over (q, t, q*t, |q-t|, cos)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from matching.config import ScorerConfig
from matching.errors import BundleError
from matching.features import LEXICAL_FEATURES
from matching.layout import SCORER_CONFIG, SCORER_WEIGHTS
from matching.types import Fusion, ScorerForm


def feature_count(adaptive: bool, spanned: bool = False) -> int:
    """Lexical feature columns a scorer takes: the adaptive fusion adds the query's known-token share, and a span
    the length lift after it."""
    return LEXICAL_FEATURES + int(adaptive) + int(adaptive and spanned)


class Scorer(nn.Module):
    """score(q, t[, lex]) = base + residual. Without lexical features: base = cos(q, t), residual = MLP(q, t, q*t,
    |q-t|, cos). With them: base = ``w * cos + (1 - w) * lex[:, 0]`` (lex[:, 0] is the normalised BM25; see
    :mod:`matching.features`), residual = MLP(cos, lex without the length lift) + v . (q*t).

    The residual's output layers start at zero, so an untrained scorer ranks exactly as its base score does.
    The lexical form leaves the raw vectors out of the MLP: with them (773 inputs) a scorer trained on LCQMC dev fell
    to 0.751 test ROC-AUC from 0.802 untrained and one trained on STS-B news/forum lost 0.5 Spearman points on its
    captions; with the scalars and a weighted cosine it reaches 0.804, and gains 0.4 points on the captions.
    """

    def __init__(self, config: ScorerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        # the length lift weighs the base score only: as an input, the MLP trained on LCQMC dev fell to 0.7825 test
        # ROC-AUC (0.8156 without it; untrained 0.8432), and the linear form led on held-out dev by 5.7 points
        self.inputs = 1 + feature_count(config.fusion is Fusion.ADAPTIVE) if config.lexical else 4 * d + 1
        inputs = self.inputs
        self.mlp: nn.Sequential
        if config.form is ScorerForm.LINEAR:
            self.mlp = nn.Sequential(nn.Linear(inputs, 1))
        else:
            self.mlp = nn.Sequential(
                nn.Linear(inputs, config.hidden), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(config.hidden, 1)
            )
        out = self.mlp[-1]
        assert isinstance(out, nn.Linear)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        # the catalogue's mean cosine (features.centred), set from the generation's manifest by whoever loads the
        # scorer beside a catalogue: it follows the catalogue, not the weights
        self.centre = 0.0
        self.weighted: nn.Linear | None = None
        if config.lexical and config.form is ScorerForm.MLP:
            self.weighted = nn.Linear(d, 1, bias=False)  # v . (q*t): a learned weighting of the cosine's terms
            nn.init.zeros_(self.weighted.weight)

    def forward(self, q: torch.Tensor, t: torch.Tensor, lex: torch.Tensor | None = None) -> torch.Tensor:
        """Scores for matching rows of ``q`` (n, d) and ``t`` (n, d); q may be (1, d) to broadcast. ``lex``
        (n, :func:`feature_count`) is required when the config has lexical features."""
        q = q.expand_as(t)
        cos = (q * t).sum(dim=-1, keepdim=True)
        if not self.config.lexical:
            plain: torch.Tensor = (cos + self.mlp(torch.cat([q, t, q * t, (q - t).abs(), cos], dim=-1))).squeeze(-1)
            return plain
        wanted = feature_count(self.config.fusion is Fusion.ADAPTIVE, self.config.dense_span > 0)
        if lex is None or lex.shape[-1] != wanted:
            raise ValueError(f"this scorer takes {wanted} lexical feature columns: pass them as lex")
        w: float | torch.Tensor = self.config.dense_weight
        if self.config.fusion is Fusion.ADAPTIVE:  # features.adaptive_weights: known share, term-count ratio, lift
            floor: float | torch.Tensor = self.config.dense_floor
            if self.config.dense_span > 0:
                floor = floor + (1.0 - floor) * lex[:, LEXICAL_FEATURES + 1 : LEXICAL_FEATURES + 2]
            known = lex[:, LEXICAL_FEATURES : LEXICAL_FEATURES + 1]
            if self.config.known_power != 1.0:
                known = known**self.config.known_power
            w = w * known * (floor + (1.0 - floor) * lex[:, 3:4])
        c = self.centre  # features.centred: the catalogue's mean cosine reads 0
        dense = (cos - c) / (1.0 - c) if c else cos
        base = w * dense + (1.0 - w) * lex[:, :1]
        residual = self.mlp(torch.cat([dense, lex[:, : self.inputs - 1]], dim=-1))
        if self.weighted is not None:
            residual = residual + self.weighted(q * t)
        out: torch.Tensor = (base + residual).squeeze(-1)
        return out

    @property
    def trained(self) -> bool:
        """False while the residual's output layers are zero: the score is then exactly the base score."""
        return any(bool(p.detach().abs().sum() > 0) for p in self.residual_outputs())

    def residual_outputs(self) -> list[torch.Tensor]:
        """The residual's output layers (the MLP's last Linear, and the weighting of q*t): the residual is linear in
        them, so scaling them all scales it."""
        out = self.mlp[-1]
        assert isinstance(out, nn.Linear)
        return [out.weight, out.bias, *([self.weighted.weight] if self.weighted is not None else [])]

    @torch.inference_mode()
    def score(self, q: np.ndarray, t: np.ndarray, lex: np.ndarray | None = None) -> np.ndarray:
        """NumPy in, NumPy out, in eval mode on the scorer's device."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        # np.array copies: inputs may be read-only views of the memory-mapped vector file
        qt = torch.from_numpy(np.array(q, dtype=np.float32)).to(device)
        tt = torch.from_numpy(np.array(t, dtype=np.float32)).to(device)
        lt = torch.from_numpy(np.array(lex, dtype=np.float32)).to(device) if lex is not None else None
        out: np.ndarray = self(qt, tt, lt).float().cpu().numpy()
        self.train(was_training)
        return out

    def save(self, directory: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / SCORER_WEIGHTS))
        self.config.save(directory / SCORER_CONFIG)

    @classmethod
    def load(cls, directory: Path) -> Self:
        weights, config_path = directory / SCORER_WEIGHTS, directory / SCORER_CONFIG
        for p in (weights, config_path):
            if not p.is_file():
                raise BundleError(f"bundle scorer file {str(p)!r} is missing")
        try:
            config = ScorerConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
            # compare the shapes the config asks for with the file's header before allocating anything: a crafted
            # scorer.json must not make us allocate what it names (hidden=10**6 was 750 MiB before a refusal)
            with torch.device("meta"):
                wanted = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
            with safe_open(str(weights), framework="pt") as fh:
                found = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
            if found != wanted:
                extra, missing = sorted(set(found) - set(wanted)), sorted(set(wanted) - set(found))
                differ = [f"{k} {found[k]} vs {wanted[k]}" for k in wanted if k in found and found[k] != wanted[k]]
                raise ValueError(
                    f"{SCORER_CONFIG} and {SCORER_WEIGHTS} disagree: unexpected {extra}, missing {missing}, "
                    f"other shapes {differ}"
                )
            model = cls(config)
            model.load_state_dict(load_file(str(weights)), strict=True)
        except (RuntimeError, ValueError, OSError, TypeError, SafetensorError) as exc:
            raise BundleError(f"cannot load the scorer from {str(directory)!r}: {exc}") from None
        return model.eval()
