"""Training the reranker on labelled pairs (kept apart from inference: nothing here runs at query time)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from matching.config import JsonConfig, ScorerConfig
from matching.errors import ConfigError, SchemaError
from matching.features import LEXICAL_FEATURES
from matching.metrics import ndcg_at_k, roc_auc, spearman
from matching.scorer import Scorer
from matching.training.loop import (
    EarlyStopping,
    SearchReport,
    TrainReport,
    configured,
    cosent_loss,
    random_search,
    seed_everything,
    train_valid_pairs,
    unique_queries,
    warmup_linear,
)

if TYPE_CHECKING:
    from matching.search import Snapshot

log = logging.getLogger(__name__)
# negatives mined per positive when training listwise without an explicit hard_negatives
DEFAULT_MINED = 20


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
    loss: LossKind = LossKind.AUTO
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


# -- data --------------------------------------------------------------------------------------------


@dataclass
class _Groups:
    """Listwise training data: per group, candidate vectors with the positive first, and a mask."""

    q: torch.Tensor  # (g, d)
    t: torch.Tensor  # (g, m, d)
    lex: torch.Tensor  # (g, m, LEXICAL_FEATURES); zeros for a scorer without lexical features
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
        return np.zeros((len(queries), LEXICAL_FEATURES), dtype=np.float32)
    return snap.lexical_features(queries, titles)


def _listwise_groups(
    snap: Snapshot, pairs: pd.DataFrame, q: np.ndarray, t: np.ndarray, lex: np.ndarray, cfg: TrainConfig, lexical: bool
) -> _Groups:
    """One group per positive pair: [positive, labelled negatives + negatives mined from the index]."""
    uq, qv = unique_queries(pairs, q)
    positive_rows: dict[str, set[int]] = {qq: set() for qq in uq}
    found = snap.store.find_titles(pairs["title"].tolist())
    for qq, row, label in zip(pairs["query"], found, pairs["label"], strict=True):
        if label > 0 and row is not None:
            positive_rows[qq].add(row)
    mined: dict[str, list[int]] = {qq: [] for qq in uq}
    mine = cfg.hard_negatives if cfg.hard_negatives is not None else DEFAULT_MINED
    if mine:
        ids = _candidates(snap, uq, qv, cfg.mine_depth)
        for qq, row_ids in zip(uq, ids, strict=True):
            mined[qq] = [int(r) for r in row_ids if r >= 0 and int(r) not in positive_rows[qq]][:mine]
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
    ll = np.zeros((len(groups_t), width, LEXICAL_FEATURES), dtype=np.float32)
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
) -> Callable[[Scorer], float]:
    """nDCG@10 of reranking the top ``depth`` retrieved titles for each validation query."""
    uq, qv = unique_queries(pairs, q)
    rel: dict[str, dict[str, int]] = {qq: {} for qq in uq}
    found = snap.store.find_titles(pairs["title"].tolist())
    for qq, row, label in zip(pairs["query"], found, pairs["label"], strict=True):
        key = str(row) if row is not None else f"missing:{len(rel[qq])}"
        if label > 0:
            rel[qq][key] = max(1, round(label))  # a positive label below 0.5 is still a positive
    ids = _candidates(snap, uq, qv, depth)
    cand_vecs = [np.asarray(snap.store.vectors[r[r >= 0]]) for r in ids]
    cand_lex = [
        _features(snap, lexical, [qq] * int((r >= 0).sum()), [x.title for x in snap.store.get(r[r >= 0].tolist())])
        for qq, r in zip(uq, ids, strict=True)
    ]

    def metric(scorer: Scorer) -> float:
        total = 0.0
        for i, qq in enumerate(uq):
            row_ids = ids[i][ids[i] >= 0]
            scores = scorer.score(qv[i : i + 1], cand_vecs[i], cand_lex[i] if lexical else None)
            ranked = [str(r) for r in row_ids[np.argsort(-scores, kind="stable")]]
            total += ndcg_at_k(ranked, rel[qq], 10)
        return total / len(uq)

    return metric


def _pair_validator(
    q: np.ndarray, t: np.ndarray, lex: np.ndarray | None, labels: np.ndarray, binary: bool
) -> Callable[[Scorer], float]:
    def metric(scorer: Scorer) -> float:
        scores = scorer.score(q, t, lex)
        return roc_auc(labels, scores) if binary else spearman(scores, labels)

    return metric


# -- losses --------------------------------------------------------------------------------------


def _listwise_loss(scorer: Scorer, g: _Groups, temperature: float) -> torch.Tensor:
    n, m, d = g.t.shape
    lex = g.lex.reshape(n * m, -1) if scorer.config.lexical else None
    scores = scorer(g.q.unsqueeze(1).expand(n, m, d).reshape(-1, d), g.t.reshape(-1, d), lex).reshape(n, m)
    logits = (scores / temperature).masked_fill(~g.mask, float("-inf"))
    per_group = -torch.log_softmax(logits, dim=-1)[:, 0]
    return (per_group * g.weight).sum() / g.weight.sum()


# -- the loop ------------------------------------------------------------------------------------


def train_scorer(
    snap: Snapshot,
    train_pairs: pd.DataFrame | str | Path,
    valid_pairs: pd.DataFrame | str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    show_progress: bool = True,
    **settings: Any,
) -> tuple[Scorer, TrainReport]:
    """Train a fresh scorer for the snapshot's vectors; returns the best checkpoint and a report.

    ``settings`` override fields of ``config`` (e.g. ``epochs=5, hard_negatives=20``).
    """
    cfg = configured(TrainConfig, config, settings)
    started = time.perf_counter()
    seed_everything(cfg.seed)

    train, valid = train_valid_pairs(train_pairs, valid_pairs, cfg)
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
    if loss_kind is LossKind.LISTWISE:
        lex_tr = _features(snap, lexical, train["query"].tolist(), train["title"].tolist())
        groups = _listwise_groups(snap, train, q_tr, t_tr, lex_tr, cfg, lexical)
        n_items = len(groups.q)
        validate = _retrieval_validator(snap, valid, q_va, cfg.mine_depth, lexical)
        metric_name = "ndcg@10"
    else:
        labels_tr = torch.tensor(train["label"].to_numpy(), dtype=torch.float32)
        low, high = float(labels_tr.min()), float(labels_tr.max())
        targets_tr = (labels_tr - low) / (high - low) if high > low else torch.ones_like(labels_tr)
        n_items = len(train)
        lex_va = _features(snap, lexical, valid["query"].tolist(), valid["title"].tolist()) if lexical else None
        validate = _pair_validator(q_va, t_va, lex_va, valid["label"].to_numpy(), binary)
        metric_name = "roc_auc" if binary else "spearman"
        q_t, t_t = torch.from_numpy(q_tr), torch.from_numpy(t_tr)
        lex_t = torch.from_numpy(_features(snap, lexical, train["query"].tolist(), train["title"].tolist()))

    base = snap.scorer.config
    scorer = Scorer(
        ScorerConfig(
            dim=snap.encoder.dim,
            hidden=cfg.hidden,
            dropout=cfg.dropout,
            lexical=lexical,
            dense_weight=base.dense_weight if lexical else 1.0,
        )
    )
    # BCE needs calibrated logits: a learned affine map of the score, used in training only.
    affine = nn.Linear(1, 1)
    nn.init.constant_(affine.weight, 1.0 / cfg.temperature)
    nn.init.constant_(affine.bias, -0.5 / cfg.temperature)
    params = list(scorer.parameters()) + (list(affine.parameters()) if loss_kind is LossKind.BCE else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = warmup_linear(optimizer, math.ceil(n_items / cfg.batch_size) * cfg.epochs, cfg.warmup)
    baseline = validate(scorer)
    report = TrainReport(
        config=cfg.to_dict(),
        loss=loss_kind.value,
        loss_reason=why,
        metric=metric_name,
        baseline=baseline,
        best_metric=baseline,
        best_epoch=0,
        train_pairs=len(train),
        valid_queries=int(valid["query"].nunique()),
    )
    stopper = EarlyStopping(scorer, report, cfg.patience)
    generator = torch.Generator().manual_seed(cfg.seed)
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="training scorer", disable=not show_progress):
        scorer.train()
        perm = torch.randperm(n_items, generator=generator)
        epoch_loss = 0.0
        for start in range(0, n_items, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            if loss_kind is LossKind.LISTWISE:
                g = _Groups(groups.q[idx], groups.t[idx], groups.lex[idx], groups.weight[idx], groups.mask[idx])
                loss = _listwise_loss(scorer, g, cfg.temperature)
            else:
                scores = scorer(q_t[idx], t_t[idx], lex_t[idx] if lexical else None)
                if loss_kind is LossKind.BCE:
                    logits = affine(scores.unsqueeze(-1)).squeeze(-1)
                    loss = nn.functional.binary_cross_entropy_with_logits(logits, (labels_tr[idx] > 0).float())
                elif loss_kind is LossKind.MSE:
                    loss = nn.functional.mse_loss(scores, targets_tr[idx])
                else:
                    loss = cosent_loss(scores, labels_tr[idx], cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            lr_sched.step()
            epoch_loss += float(loss.detach()) * len(idx)
        if stopper.step(epoch, epoch_loss / n_items, validate(scorer)):
            break
    stopper.restore(started)
    return scorer, report


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
