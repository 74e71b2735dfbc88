"""The one training loop's pieces: reading labelled pairs, seeds, the one optimiser step (:class:`Optimisation`),
early stopping, one validator per metric, random search and the report. Used by every trainer (reranker, query
tower, encoder fine-tune, distillation); nothing here runs at query time."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from matching.errors import SchemaError
from matching.ingest import read_table, reading
from matching.metrics import ndcg_at_k, roc_auc, spearman

if TYPE_CHECKING:
    from matching.config import JsonConfig

log = logging.getLogger(__name__)


class PairColumns(Protocol):
    """The column names of a pairs table (every trainer's config has them)."""

    @property
    def query_column(self) -> str: ...
    @property
    def title_column(self) -> str: ...
    @property
    def label_column(self) -> str: ...


class SplitSettings(PairColumns, Protocol):
    """A trainer config's pair columns, plus how to split off validation queries."""

    @property
    def valid_fraction(self) -> float: ...
    @property
    def seed(self) -> int: ...


C = TypeVar("C", bound="JsonConfig")
M = TypeVar("M")


@dataclass
class TrainReport:
    """What a training run did: the validation metric per epoch and the checkpoint kept."""

    config: dict[str, Any]
    loss: str
    metric: str
    baseline: float  # the validation metric of the scorer training started from
    best_metric: float
    best_epoch: float  # 0 means no epoch beat the starting state, which is kept (fractions: mid-epoch checks)
    epochs: list[dict[str, float]] = field(default_factory=list)
    train_pairs: int = 0
    valid_queries: int = 0
    seconds: float = 0.0
    loss_reason: str = ""  # why this loss: what the labels looked like
    scorer_report: dict[str, Any] | None = None  # an encoder fine-tune: the reranker retrained after it
    chosen: str = ""  # a reranker: which form won on the validation pairs ("default": nothing was learned)
    compared: dict[str, float] = field(default_factory=dict)  # a reranker: each form's validation metric

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        lines = [f"{'epoch':>5}  {'loss':>8}  {self.metric:>10}", f"{0:>5}  {'-':>8}  {self.baseline:>10.4f}"]
        lines += [f"{e['epoch']:>5g}  {e['loss']:>8.4f}  {e['metric']:>10.4f}" for e in self.epochs]
        why = f" ({self.loss_reason})" if self.loss_reason else ""
        share = self.config.get("residual_share", 1.0)
        published = f" with the residual at share {share:g}" if share < 1 and self.best_epoch else ""
        lines.append(
            f"best: epoch {self.best_epoch}, {self.metric}{published} {self.best_metric:.4f} ({self.seconds:.1f}s); "
            f"loss {self.loss}{why}"
        )
        if self.compared:
            figures = ", ".join(f"{name} {value:.4f}" for name, value in self.compared.items())
            verdict = (
                "nothing learned beat the untrained default: it stays, nothing is published"
                if self.chosen == "default"
                else f"chosen: {self.chosen}"
            )
            lines.append(f"held-out {self.metric}: {figures}; {verdict}")
        return "\n".join(lines)


# -- data


def read_pairs(source: pd.DataFrame | str | Path, config: PairColumns) -> pd.DataFrame:
    """A (query, title, label) table with the configured column names, checked."""
    if isinstance(source, pd.DataFrame):
        frame, name = source, "the pairs DataFrame"
    else:
        path = Path(source)
        name = repr(str(path))
        if not path.is_file():
            raise SchemaError(f"pairs file {name} does not exist or is not a file")
        with reading(path):
            frame = next(read_table(path, text_columns=[config.query_column, config.title_column]))
    cols = [config.query_column, config.title_column, config.label_column]
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise SchemaError(f"{name} has no column {missing}; its columns are {list(map(str, frame.columns))}")
    labels = pd.to_numeric(frame[config.label_column], errors="coerce")
    bad = np.flatnonzero(~np.isfinite(labels.to_numpy(dtype=float)))
    if len(bad):
        raise SchemaError(
            f"{name}, row {bad[0] + 1}: label {frame[config.label_column].iloc[bad[0]]!r} is not a number "
            "(labels must be finite numbers)"
        )
    for col in cols[:2]:
        empty = np.flatnonzero(frame[col].isna().to_numpy() | (frame[col].astype(str).str.strip() == ""))
        if len(empty):
            raise SchemaError(f"{name}, row {empty[0] + 1}: column {col!r} is empty")
    return pd.DataFrame(
        {
            "query": frame[cols[0]].astype(str),
            "title": frame[cols[1]].astype(str),
            "label": labels.astype(float),
        }
    ).reset_index(drop=True)


def configured(cls: type[C], config: C | None, settings: dict[str, Any]) -> C:
    """``config`` (default: ``cls()``) with the fields named in ``settings`` replaced, checked as a whole."""
    cfg = config or cls()
    return cls.from_dict({**cfg.to_dict(), **settings}) if settings else cfg


def train_valid_pairs(
    train_pairs: pd.DataFrame | str | Path, valid_pairs: pd.DataFrame | str | Path | None, cfg: SplitSettings
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training and validation pairs, read and checked; without ``valid_pairs``, a share of the training
    queries (``cfg.valid_fraction``) is split off."""
    train = read_pairs(train_pairs, cfg)
    valid = read_pairs(valid_pairs, cfg) if valid_pairs is not None else None
    if valid is None:
        train, valid = split_by_query(train, cfg.valid_fraction, cfg.seed)
    return train, valid


def split_by_query(pairs: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    queries = sorted(pairs["query"].unique())
    random.Random(seed).shuffle(queries)
    n_valid = max(1, round(len(queries) * fraction))
    valid = set(queries[:n_valid])
    mask = pairs["query"].isin(valid)
    if mask.all():
        raise SchemaError("too few distinct queries to split off a validation set; pass valid_pairs")
    return pairs[~mask].reset_index(drop=True), pairs[mask].reset_index(drop=True)


def unique_queries(pairs: pd.DataFrame, q: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The distinct queries of ``pairs`` in first-seen order, with their vectors (rows of ``q``)."""
    first: dict[str, int] = {}
    for i, query in enumerate(pairs["query"]):
        first.setdefault(query, i)
    return list(first), q[list(first.values())]


# -- the loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_linear(optimizer: torch.optim.Optimizer, total_steps: int, warmup_share: float) -> Any:
    """Linear warm-up over ``warmup_share`` of the steps, then linear decay to zero."""
    warmup = max(1, int(warmup_share * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Optimisation:
    """The one optimiser step of every trainer: AdamW, linear warm-up then decay (:func:`warmup_linear`), gradient
    clipping (``clip=None``: none) and, with ``autocast``, the forward pass under that dtype on ``device``.

    A trainer computes its loss (inside :meth:`autocast`) and hands it to :meth:`update`; no trainer touches the
    optimiser itself (``tests/test_training_loop.py`` checks it)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        *,
        lr: float,
        weight_decay: float,
        total_steps: int,
        warmup: float,
        clip: float | None,
        autocast: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = warmup_linear(self.optimizer, total_steps, warmup)
        self.total_steps = total_steps
        self.clip = clip
        self.dtype = autocast
        self.device_type = (device or torch.device("cpu")).type

    def autocast(self) -> torch.autocast:
        """The context the forward pass runs in (a no-op without an autocast dtype)."""
        return torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)

    def update(self, loss: torch.Tensor) -> float:
        """One step on ``loss``: gradients, clipping, the optimiser and the schedule; the loss as a float."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if self.clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())


class EarlyStopping:
    """Keeps the state of ``module`` at its best validation value (starting from ``report.baseline``)."""

    def __init__(self, module: nn.Module, report: TrainReport, patience: int) -> None:
        self.module, self.report, self.patience = module, report, patience
        self.best_state = copy.deepcopy(module.state_dict())
        self.stale = 0

    def check(self, epoch: float, loss: float, value: float) -> bool:
        """Record an epoch; True when training should stop. A non-finite loss or metric stops it."""
        self.report.epochs.append({"epoch": epoch, "loss": loss, "metric": value})
        if not (math.isfinite(loss) and math.isfinite(value)):
            log.warning(
                "epoch %g diverged (loss %s, metric %s): stopping; keeping the best earlier state", epoch, loss, value
            )
            return True
        if value > self.report.best_metric:
            self.report.best_metric, self.report.best_epoch = value, epoch
            self.best_state = copy.deepcopy(self.module.state_dict())
            self.stale = 0
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self, started: float) -> None:
        """Load the best state back (the starting one if no epoch beat it) and stamp the duration."""
        self.module.load_state_dict(self.best_state)
        self.module.eval()
        self.report.seconds = time.perf_counter() - started


# -- validators: one per metric


@dataclass(frozen=True)
class Validator(Generic[M]):
    """A validation metric that can also be read on resamples: ``units(model)`` gives one value per validation
    unit (a query's nDCG, a pair's score) and ``summary(units, idx)`` the metric over the units ``idx`` (all when
    None). Calling it gives the metric over all units."""

    units: Callable[[M], np.ndarray]
    summary: Callable[[np.ndarray, np.ndarray | None], float]

    def __call__(self, model: M) -> float:
        return self.summary(self.units(model), None)


def ndcg_validator(
    relevant: Sequence[Mapping[str, int]], rank: Callable[[M], Sequence[Sequence[str]]], k: int = 10
) -> Validator[M]:
    """Mean nDCG@k over the validation queries: ``rank(model)`` gives each query's candidates (keys) in the
    model's order, ``relevant[i]`` the grades of query i's relevant keys."""

    def units(model: M) -> np.ndarray:
        ranked = rank(model)
        return np.array([ndcg_at_k(list(r), rel, k) for r, rel in zip(ranked, relevant, strict=True)])

    def summary(values: np.ndarray, idx: np.ndarray | None) -> float:
        return float(np.mean(values if idx is None else values[idx]))

    return Validator(units, summary)


class PairMetric(StrEnum):
    """How scores of labelled validation pairs are compared with the labels."""

    ROC_AUC = "roc_auc"  # 0/1 labels: how well the score separates them
    SPEARMAN = "spearman"  # rank correlation with (graded) labels


def pair_validator(labels: np.ndarray, score: Callable[[M], np.ndarray], metric: PairMetric) -> Validator[M]:
    """The metric of ``score(model)`` (one score per validation pair) against ``labels``."""

    def summary(scores: np.ndarray, idx: np.ndarray | None) -> float:
        y, s = (labels, scores) if idx is None else (labels[idx], scores[idx])
        return roc_auc(y, s) if metric is PairMetric.ROC_AUC else spearman(s, y)

    return Validator(score, summary)


# resamples of the validation units for a paired bootstrap, and the share of them in which a challenger must win
BOOTSTRAP_DRAWS = 200
BOOTSTRAP_LEVEL = 0.95


def significantly_better(validator: Validator[M], incumbent: M, challenger: M, *, seed: int = 0) -> bool:
    """Whether ``challenger`` beats ``incumbent`` on the validation units beyond chance: its metric is higher in at
    least :data:`BOOTSTRAP_LEVEL` of :data:`BOOTSTRAP_DRAWS` paired resamples of the units (queries or pairs)."""
    a, b = validator.units(incumbent), validator.units(challenger)
    rng = np.random.default_rng(seed)
    wins = 0
    for _ in range(BOOTSTRAP_DRAWS):
        idx = rng.integers(0, len(a), len(a))
        gain = validator.summary(b, idx) - validator.summary(a, idx)
        wins += bool(gain > 0)  # a NaN (a resample with one class) counts as no win
    return wins >= BOOTSTRAP_LEVEL * BOOTSTRAP_DRAWS


# -- hyper-parameter search


@dataclass
class SearchReport:
    """Every trial's settings and validation result, and which one won."""

    metric: str
    trials: list[dict[str, Any]]
    best_trial: int

    @property
    def best(self) -> dict[str, Any]:
        return self.trials[self.best_trial]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        keys = sorted({k for t in self.trials for k in t["settings"]})
        head = f"{'trial':>5}  " + "  ".join(f"{k:>14}" for k in keys) + f"  {self.metric:>10}  {'epoch':>5}"
        lines = [head]
        for i, t in enumerate(self.trials):
            mark = " *" if i == self.best_trial else ""
            cells = "  ".join(f"{t['settings'].get(k, '-')!s:>14}" for k in keys)
            lines.append(f"{i:>5}  {cells}  {t['best_metric']:>10.4f}  {t['best_epoch']:>5}{mark}")
        return "\n".join(lines)


def random_search(
    run: Callable[[dict[str, Any]], tuple[M, TrainReport]],
    space: dict[str, list[Any]],
    *,
    trials: int,
    seed: int,
    show_progress: bool,
) -> tuple[M, TrainReport, SearchReport]:
    """Run ``trials`` settings drawn without replacement from the grid ``space`` (seeded); keep the best model.

    Plain random search: a handful of trials is what a budget of minutes per trial buys, and for its first ten
    trials a TPE sampler (Optuna's default) samples at random too."""
    rng = random.Random(seed)
    grid = [dict(zip(space, combo, strict=True)) for combo in itertools.product(*space.values())]
    rng.shuffle(grid)
    chosen = grid[: max(1, trials)]
    results: list[dict[str, Any]] = []
    best: tuple[TrainReport, M, int] | None = None
    for i, trial in enumerate(chosen):
        model, report = run(trial)
        results.append(
            {"settings": trial, "best_metric": report.best_metric, "best_epoch": report.best_epoch, "trial": i}
        )
        if show_progress:
            log.warning("trial %d/%d %s: %s %.4f", i + 1, len(chosen), trial, report.metric, report.best_metric)
        if best is None or report.best_metric > best[0].best_metric:
            best = (report, model, i)
    assert best is not None  # chosen is never empty
    report, model, best_index = best
    return model, report, SearchReport(metric=report.metric, trials=results, best_trial=best_index)
