"""Training the reranker on labelled pairs (kept apart from inference: nothing here runs at query time)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from matching import progress
from matching.config import JsonConfig, ScorerConfig
from matching.errors import ConfigError, SchemaError
from matching.scorer import Scorer, feature_count
from matching.training.loop import (
    EarlyStopping,
    Optimisation,
    PairMetric,
    SearchReport,
    TrainReport,
    Validator,
    configured,
    ndcg_validator,
    pair_validator,
    random_search,
    seed_everything,
    significantly_better,
    train_valid_pairs,
    unique_queries,
)
from matching.training.losses import AffineBCELoss, CoSENTLoss, InfoNCELoss, MSELoss, PairLoss
from matching.training.mining import MARGIN, mine_negatives, positive_rows
from matching.types import Fusion, ScorerForm

if TYPE_CHECKING:
    from matching.search import Snapshot

log = logging.getLogger(__name__)
# negatives mined per positive when training listwise without an explicit hard_negatives
DEFAULT_MINED = 20
# A learned form replaces the untrained default (or the linear form) only when a paired bootstrap over the validation
# units says it wins beyond chance (loop.significantly_better): validation picked its checkpoint too, so a small edge
# is as likely noise as gain. With a plain margin of 0.005, SciFact published an MLP that led by 0.008 nDCG@10 on its
# 80 validation queries and lost 0.6 points on test.
# the linear form's learning rate over ``lr``: its few weights move slowly while the BCE calibration settles (MRPC
# val ROC-AUC: at 1e-3 no epoch beat the default's 0.7727 before patience ran out; at 1e-2, 0.7812)
LINEAR_LR_FACTOR = 10.0
# TrainConfig.residual_share's default: the published score is the untrained one plus half the learned residual (an
# average of the default and the trained scorer, as WiSE-FT averages weights). Validation cannot pick the share: its
# pairs are like the training pairs, and there the full residual leads. On other pairs the full one costs. Test
# figure minus the untrained one, in points, at shares 0.25 / 0.5 / 0.75 / 1 (scripts/eval_residual_share.py):
# LCQMC trained on dev +0.3 / +0.4 / -0.2 / -2.8; STS-B +0.4 / +0.6 / +0.8 / +0.8; its captions trained on the
# other genres -0.1 / -0.2 / -0.5 / -0.8; MRPC +0.7 / +1.5 / +2.4 / +3.3; after a fine-tune: STS-B +0.3 / +0.6 /
# +0.7 / +0.8, SciFact nDCG@10 +0.8 / +1.2 / +1.2 / +0.7, LCQMC with multilingual-e5-small -0.3 / -0.5 / -0.8 /
# -1.0. Mean over the eight sets +0.28 / +0.45 / +0.46 / +0.12; worst -0.3 / -0.5 / -0.8 / -2.8.
RESIDUAL_SHARE = 0.5


class LossKind(StrEnum):
    """Training objective. ``auto``: listwise with mined negatives for positives-only pairs (the shape of qrels and
    clicks) or when mining is asked for, else BCE for 0/1 labels, else MSE."""

    AUTO = "auto"
    LISTWISE = "listwise"  # softmax over (positive, negatives) groups: InfoNCE with hard negatives
    BCE = "bce"  # binary cross-entropy on a learned affine map of the score
    MSE = "mse"  # regression of the score onto the labels scaled to [0, 1]
    COSENT = "cosent"  # pairwise ranking of graded labels inside each batch


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """Settings for :func:`train_scorer` (all have general defaults)."""

    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    warmup: float = 0.1  # share of the steps spent warming the learning rate up
    clip: float = 1.0  # gradient-norm clipping
    patience: int = 4  # epochs without a better validation metric before stopping
    hidden: int = 256
    dropout: float = 0.1
    hard_negatives: int | None = None  # negatives mined per query from the bundle (None: 20 when listwise)
    mine_depth: int = 100  # how deep to retrieve when mining, and the rerank depth when validating
    false_negative_margin: float = MARGIN  # mined titles within this share of the weakest positive are skipped
    loss: LossKind = LossKind.AUTO
    form: ScorerForm | None = None  # None: train linear and MLP, keep what wins over the default beyond chance
    require_win: bool = True  # False: keep the best learned form even when it does not beat the default
    # the learned residual's share in the published score (base + share x residual; 1: all of it), see RESIDUAL_SHARE
    residual_share: float = RESIDUAL_SHARE
    temperature: float = 0.05
    valid_fraction: float = 0.1  # of the training queries, when no validation pairs are given
    seed: int = 0
    query_column: str = "query"
    title_column: str = "title"
    label_column: str = "label"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch_size and lr must be positive")
        if (self.hard_negatives or 0) < 0 or self.mine_depth < 1 or not 0 < self.valid_fraction < 1:
            raise ConfigError("hard_negatives >= 0, mine_depth >= 1 and 0 < valid_fraction < 1 are required")
        if self.false_negative_margin < 0:
            raise ConfigError(f"false_negative_margin must be >= 0, got {self.false_negative_margin}")
        if not 0 < self.residual_share <= 1:
            raise ConfigError(f"residual_share must be in (0, 1], got {self.residual_share}")


# -- data --------------------------------------------------------------------------------------------


@dataclass
class _Groups:
    """Listwise training data: per group, candidate vectors with the positive first, and a mask."""

    q: torch.Tensor  # (g, d)
    t: torch.Tensor  # (g, m, d)
    lex: torch.Tensor  # (g, m, features); zeros for a scorer without lexical features
    weight: torch.Tensor  # (g,) the positive's grade
    mask: torch.Tensor  # (g, m) True where a candidate exists


def _candidates(snap: Snapshot, queries: list[str], qv: np.ndarray, depth: int) -> np.ndarray:
    """Row ids (-1 padded) each query retrieves the way search does by default (hybrid where there is BM25)."""
    from matching.search import RETRIEVERS, Queries
    from matching.types import Retrieval

    way = Retrieval.HYBRID if snap.lexical is not None else Retrieval.DENSE
    return RETRIEVERS[way].retrieve(snap, Queries(qv, queries), depth, None).ids


def _features(snap: Snapshot, lexical: bool, queries: list[str], titles: list[str]) -> np.ndarray:
    if not lexical:
        return np.zeros((len(queries), feature_count(False)), dtype=np.float32)
    return snap.lexical_features(queries, titles)


def _listwise_groups(
    snap: Snapshot, pairs: pd.DataFrame, q: np.ndarray, t: np.ndarray, lex: np.ndarray, cfg: TrainConfig, lexical: bool
) -> _Groups:
    """One group per positive pair: [positive, labelled negatives + negatives mined from the index]."""
    uq, qv = unique_queries(pairs, q)
    positives = positive_rows(snap, pairs)
    mine = cfg.hard_negatives if cfg.hard_negatives is not None else DEFAULT_MINED
    rows_of = [set(positives.get(qq, ())) for qq in uq]
    negatives = mine_negatives(snap, qv, rows_of, count=mine, depth=cfg.mine_depth, margin=cfg.false_negative_margin)
    mined = dict(zip(uq, negatives, strict=True))
    groups_q, groups_t, groups_lex, weights = [], [], [], []
    for qq, sub in pairs.groupby("query", sort=False):
        idx = sub.index.to_numpy()
        labels = sub["label"].to_numpy()
        negs = [t[i] for i, lab in zip(idx, labels, strict=True) if lab <= 0]
        neg_lex = [lex[i] for i, lab in zip(idx, labels, strict=True) if lab <= 0]
        rows = mined[str(qq)]
        negs += [np.asarray(snap.store.vectors[r]) for r in rows]
        titles = [r.title for r in snap.store.get(rows)]
        neg_lex += list(_features(snap, lexical, [str(qq)] * len(rows), titles))
        for i, lab in zip(idx, labels, strict=True):
            if lab > 0 and negs:
                groups_q.append(q[i])
                groups_t.append([t[i], *negs])
                groups_lex.append([lex[i], *neg_lex])
                weights.append(float(lab))
    if not groups_q:
        raise SchemaError("listwise training needs queries with a positive and at least one negative")
    width = max(len(g) for g in groups_t)
    dim = q.shape[1]
    tt = np.zeros((len(groups_t), width, dim), dtype=np.float32)
    ll = np.zeros((len(groups_t), width, lex.shape[1]), dtype=np.float32)
    mask = np.zeros((len(groups_t), width), dtype=bool)
    for gi, g in enumerate(groups_t):
        tt[gi, : len(g)] = np.stack(g)
        ll[gi, : len(g)] = np.stack(groups_lex[gi])
        mask[gi, : len(g)] = True
    return _Groups(
        torch.from_numpy(np.stack(groups_q)),
        torch.from_numpy(tt),
        torch.from_numpy(ll),
        torch.tensor(weights),
        torch.from_numpy(mask),
    )


# -- validation ----------------------------------------------------------------------------------


def _retrieval_validator(
    snap: Snapshot, pairs: pd.DataFrame, q: np.ndarray, depth: int, lexical: bool
) -> Validator[Scorer]:
    """nDCG@10 of reranking the top ``depth`` retrieved titles for each validation query."""
    uq, qv = unique_queries(pairs, q)
    rel: dict[str, dict[str, int]] = {qq: {} for qq in uq}
    found = snap.store.find_titles(pairs["title"].tolist())
    for qq, row, label in zip(pairs["query"], found, pairs["label"], strict=True):
        key = str(row) if row is not None else f"missing:{len(rel[qq])}"
        if label > 0:
            rel[qq][key] = max(1, round(label))  # a positive label below 0.5 is still a positive
    ids = [r[r >= 0] for r in _candidates(snap, uq, qv, depth)]
    cand_vecs = [np.asarray(snap.store.vectors[r]) for r in ids]
    cand_lex = [
        _features(snap, lexical, [qq] * len(r), [x.title for x in snap.store.get(r.tolist())])
        for qq, r in zip(uq, ids, strict=True)
    ]

    def rank(scorer: Scorer) -> list[list[str]]:
        ranked = []
        for i, row_ids in enumerate(ids):
            scores = scorer.score(qv[i : i + 1], cand_vecs[i], cand_lex[i] if lexical else None)
            ranked.append([str(r) for r in row_ids[np.argsort(-scores, kind="stable")]])
        return ranked

    return ndcg_validator([rel[qq] for qq in uq], rank)


# -- the loop ------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """What every form trained on the same pairs shares: the loss, the tensors and the validator."""

    loss_kind: LossKind
    why: str
    lexical: bool
    n_items: int
    metric_name: str
    validate: Validator[Scorer]
    train_pairs: int
    valid_queries: int
    groups: _Groups | None = None
    q: torch.Tensor | None = None
    t: torch.Tensor | None = None
    lex: torch.Tensor | None = None
    y: torch.Tensor | None = None  # per pair: the label, or (MSE) the label scaled to [0, 1]


def _prepare(
    snap: Snapshot, train: pd.DataFrame, valid: pd.DataFrame, cfg: TrainConfig, show_progress: bool
) -> _Prepared:
    binary = bool(np.isin(train["label"].to_numpy(), [0.0, 1.0]).all())
    positives_only = bool(train["label"].nunique() == 1 and (train["label"] > 0).all())
    loss_kind, why = cfg.loss, "asked for"
    if loss_kind is LossKind.AUTO:
        # positives only (qrels, clicks): one class, so BCE learns nothing (ROC-AUC 0.5); rank each positive
        # above negatives mined from the bundle instead. On STS-B, MSE beat CoSENT for this frozen-vector scorer
        # (dev Spearman 0.876 vs 0.865).
        if positives_only or cfg.hard_negatives:
            loss_kind = LossKind.LISTWISE
            mined = cfg.hard_negatives if cfg.hard_negatives is not None else DEFAULT_MINED
            why = "positives only" if positives_only else "hard negatives asked for"
            why += f": each positive ranked against {mined} negatives mined from the bundle"
        elif binary:
            loss_kind, why = LossKind.BCE, "0/1 labels with both classes"
        else:
            loss_kind, why = LossKind.MSE, "graded labels"
    lexical = snap.scorer.config.lexical and snap.lexical is not None
    q_tr, t_tr = snap.encode_pairs(train["query"].tolist(), train["title"].tolist(), show_progress=show_progress)
    q_va, t_va = snap.encode_pairs(valid["query"].tolist(), valid["title"].tolist(), show_progress=show_progress)
    lex_tr = _features(snap, lexical, train["query"].tolist(), train["title"].tolist())
    n_train, n_valid = len(train), int(valid["query"].nunique())
    if loss_kind is LossKind.LISTWISE:
        groups = _listwise_groups(snap, train, q_tr, t_tr, lex_tr, cfg, lexical)
        validate = _retrieval_validator(snap, valid, q_va, cfg.mine_depth, lexical)
        return _Prepared(loss_kind, why, lexical, len(groups.q), "ndcg@10", validate, n_train, n_valid, groups=groups)
    labels = torch.tensor(train["label"].to_numpy(), dtype=torch.float32)
    low, high = float(labels.min()), float(labels.max())
    targets = (labels - low) / (high - low) if high > low else torch.ones_like(labels)
    lex_va = _features(snap, lexical, valid["query"].tolist(), valid["title"].tolist()) if lexical else None
    metric = PairMetric.ROC_AUC if binary else PairMetric.SPEARMAN
    validate = pair_validator(valid["label"].to_numpy(), lambda scorer: scorer.score(q_va, t_va, lex_va), metric)
    return _Prepared(
        loss_kind,
        why,
        lexical,
        len(train),
        metric.value,
        validate,
        n_train,
        n_valid,
        q=torch.from_numpy(q_tr),
        t=torch.from_numpy(t_tr),
        lex=torch.from_numpy(lex_tr),
        y=targets if loss_kind is LossKind.MSE else labels,
    )


def _listwise_loss(scorer: Scorer, g: _Groups, loss: InfoNCELoss) -> torch.Tensor:
    """Each group's positive (first) against its negatives, weighted by the positive's grade."""
    n, m, d = g.t.shape
    lex = g.lex.reshape(n * m, -1) if scorer.config.lexical else None
    scores = scorer(g.q.unsqueeze(1).expand(n, m, d).reshape(-1, d), g.t.reshape(-1, d), lex).reshape(n, m)
    first = torch.zeros_like(scores)
    first[:, 0] = 1.0
    return loss(scores, first, mask=g.mask, weight=g.weight)


def _batch_loss(
    scorer: Scorer, prep: _Prepared, idx: torch.Tensor, losses: dict[LossKind, PairLoss], cfg: TrainConfig
) -> torch.Tensor:
    if prep.groups is not None:
        g = prep.groups
        batch = _Groups(g.q[idx], g.t[idx], g.lex[idx], g.weight[idx], g.mask[idx])
        return _listwise_loss(scorer, batch, InfoNCELoss(cfg.temperature))
    assert prep.q is not None
    assert prep.t is not None
    assert prep.lex is not None
    assert prep.y is not None
    scores = scorer(prep.q[idx], prep.t[idx], prep.lex[idx] if prep.lexical else None)
    return losses[prep.loss_kind](scores, prep.y[idx])


def _fit(snap: Snapshot, prep: _Prepared, cfg: TrainConfig, form: ScorerForm) -> tuple[Scorer, TrainReport]:
    """Train one form of the residual from zero; the best validation state is kept (never worse than zero)."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    base = snap.scorer.config
    lexical = prep.lexical
    scorer = Scorer(
        ScorerConfig(
            dim=snap.encoder.dim,
            hidden=cfg.hidden,
            dropout=cfg.dropout,
            lexical=lexical,
            dense_weight=base.dense_weight if lexical else 1.0,
            dense_floor=base.dense_floor,
            dense_span=base.dense_span if lexical else 0.0,
            known_power=base.known_power if lexical else 1.0,
            fusion=base.fusion if lexical else Fusion.FIXED,
            form=form,
        )
    )
    scorer.centre = snap.scorer.centre if lexical else 0.0
    # every kind's loss is built, BCE's affine map included, so that the seeded random stream training draws from
    # is the same whichever loss trains
    bce = AffineBCELoss(cfg.temperature)
    losses: dict[LossKind, PairLoss] = {
        LossKind.BCE: bce,
        LossKind.MSE: MSELoss(),
        LossKind.COSENT: CoSENTLoss(cfg.temperature),
    }
    params = list(scorer.parameters()) + (list(bce.parameters()) if prep.loss_kind is LossKind.BCE else [])
    steps = math.ceil(prep.n_items / cfg.batch_size) * cfg.epochs
    lr = cfg.lr * (LINEAR_LR_FACTOR if form is ScorerForm.LINEAR else 1.0)
    optimisation = Optimisation(
        params, lr=lr, weight_decay=cfg.weight_decay, total_steps=steps, warmup=cfg.warmup, clip=cfg.clip
    )
    baseline = prep.validate(scorer)
    report = TrainReport(
        config=cfg.to_dict(),
        loss=prep.loss_kind.value,
        loss_reason=prep.why,
        metric=prep.metric_name,
        baseline=baseline,
        best_metric=baseline,
        best_epoch=0,
        train_pairs=prep.train_pairs,
        valid_queries=prep.valid_queries,
    )
    stopper = EarlyStopping(scorer, report, cfg.patience)
    generator = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(1, cfg.epochs + 1):
        scorer.train()
        perm = torch.randperm(prep.n_items, generator=generator)
        epoch_loss = 0.0
        for start in range(0, prep.n_items, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            epoch_loss += optimisation.update(_batch_loss(scorer, prep, idx, losses, cfg)) * len(idx)
        if stopper.check(epoch, epoch_loss / prep.n_items, prep.validate(scorer)):
            break
    stopper.restore(started)
    return scorer, report


def train_scorer(
    snap: Snapshot,
    train_pairs: pd.DataFrame | str | Path,
    valid_pairs: pd.DataFrame | str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    show_progress: bool = True,
    **settings: Any,
) -> tuple[Scorer, TrainReport]:
    """Train scorers for the snapshot's vectors on held-in pairs and keep the one that wins on the held-out ones.

    The untrained default, the linear residual and the MLP residual (``form``: only that one) are compared on the
    validation pairs (given, or split off the training queries), each learned form as it would be published: its
    residual at ``residual_share`` (:data:`RESIDUAL_SHARE`); a learned form replaces a simpler one only when it
    beats it beyond chance (:func:`~matching.training.loop.significantly_better`). ``report.chosen`` says which
    won (``"default"``: nothing learned beat the untrained score, which is returned unchanged), ``report.compared``
    the figures (and each form's with its full residual). ``settings`` override fields of ``config`` (e.g.
    ``epochs=5, hard_negatives=20``).
    """
    cfg = configured(TrainConfig, config, settings)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    train, valid = train_valid_pairs(train_pairs, valid_pairs, cfg)
    prep = _prepare(snap, train, valid, cfg, show_progress)
    forms = [cfg.form] if cfg.form is not None else [ScorerForm.LINEAR, ScorerForm.MLP]
    fitted = {f: _fit(snap, prep, cfg, f) for f in progress.each(forms, show_progress, desc="training scorer")}
    first_scorer, first_report = next(iter(fitted.values()))
    default = first_report.baseline
    full = {f.value: r.best_metric for f, (_, r) in fitted.items()}
    if cfg.residual_share < 1:
        for scorer, report in fitted.values():
            if scorer.trained:
                shared_residual(scorer, cfg.residual_share)
                report.best_metric = prep.validate(scorer)
    chosen: str = "default"
    # the zero residual scores as the untrained default
    best_scorer, best_report = Scorer(dataclasses.replace(first_scorer.config)).eval(), first_report
    best_scorer.centre = first_scorer.centre
    best_value = default
    for form, (scorer, report) in fitted.items():
        if report.best_metric > best_value and significantly_better(prep.validate, best_scorer, scorer):
            chosen, best_scorer, best_report, best_value = form.value, scorer, report, report.best_metric
    if chosen == "default" and not cfg.require_win:
        form, (best_scorer, best_report) = max(fitted.items(), key=lambda item: item[1][1].best_metric)
        chosen = form.value
    if chosen == "default":  # what is returned scores as the default: so does its report (a search ranks by it)
        best_report = dataclasses.replace(best_report, best_metric=default, best_epoch=0)
    best_report.chosen = chosen
    best_report.compared = {"default": default, **{f.value: r.best_metric for f, (_, r) in fitted.items()}}
    if cfg.residual_share < 1:
        best_report.compared |= {f"{name} (full residual)": value for name, value in full.items()}
    best_report.seconds = time.perf_counter() - started
    return best_scorer, best_report


def shared_residual(scorer: Scorer, share: float) -> Scorer:
    """Scale ``scorer``'s learned residual by ``share`` in place (its output layers: the score becomes base +
    share x residual); returns it."""
    with torch.no_grad():
        for p in scorer.residual_outputs():
            p.mul_(share)
    return scorer


# -- hyper-parameter search ----------------------------------------------------------------------

DEFAULT_SPACE: dict[str, list[Any]] = {
    "lr": [3e-4, 1e-3, 3e-3],
    "hidden": [128, 256, 512],
    "dropout": [0.0, 0.1, 0.3],
    "hard_negatives": [10, 20, 50],
}


def search_scorer(
    snap: Snapshot,
    train_pairs: pd.DataFrame | str | Path,
    valid_pairs: pd.DataFrame | str | Path | None = None,
    *,
    trials: int = 8,
    space: dict[str, list[Any]] | None = None,
    seed: int = 0,
    show_progress: bool = True,
    **settings: Any,
) -> tuple[Scorer, TrainReport, SearchReport]:
    """Random search over ``space`` (defaults: :data:`DEFAULT_SPACE`); returns the best trial's scorer.

    Trials share one validation split and seed, so they differ only in the searched settings.
    ``hard_negatives`` is searched only when listwise training is in use (``settings`` asks for mining).
    """
    space = dict(space or DEFAULT_SPACE)
    if not settings.get("hard_negatives"):
        space.pop("hard_negatives", None)

    def run(trial: dict[str, Any]) -> tuple[Scorer, TrainReport]:
        return train_scorer(snap, train_pairs, valid_pairs, show_progress=False, **{**settings, "seed": seed, **trial})

    return random_search(run, space, trials=trials, seed=seed, show_progress=show_progress)
