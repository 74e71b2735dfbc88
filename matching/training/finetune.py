"""Fine-tuning the shared encoder (title and query towers alike) on labelled pairs.

The loss follows the labels: pairs that are all positives (qrels, clicks) train with in-batch negatives plus
negatives mined from the bundle (multiple-negatives ranking, InfoNCE); 0/1 or graded labels train with CoSENT,
which ranks every pair of a batch above the pairs labelled lower. AdamW, linear warm-up then decay, gradient
clipping, fixed seeds, and early stopping on a validation metric measured before training too: the encoder
returned is never worse on it than the one training started from. The titles must be encoded again afterwards
(:meth:`matching.Matcher.finetune` does it and publishes one new generation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from matching import progress
from matching.accel import bf16_training
from matching.config import JsonConfig
from matching.encoder import Encoder
from matching.errors import ConfigError, SchemaError
from matching.training.loop import (
    EarlyStopping,
    Optimisation,
    PairMetric,
    SearchReport,
    TrainReport,
    configured,
    ndcg_validator,
    pair_validator,
    random_search,
    seed_everything,
    train_valid_pairs,
)
from matching.training.losses import CoSENTLoss, MNRLLoss
from matching.training.mining import MARGIN, mine_negatives, positive_rows
from matching.types import EncoderLoss

if TYPE_CHECKING:
    from collections.abc import Callable

    from matching.search import Snapshot


@dataclass(frozen=True)
class FinetuneConfig(JsonConfig):
    """Settings for :func:`finetune_encoder` (general defaults: those of sentence-transformers' recipes)."""

    epochs: int = 0  # 0: enough passes for MIN_STEPS optimiser steps, from 2 to 10 (small sets get more)
    lr: float = 2e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    warmup: float = 0.1  # share of the steps spent warming the learning rate up
    clip: float = 1.0  # gradient-norm clipping
    evals_per_epoch: int = 2  # validations per epoch (early stopping can keep a mid-epoch state)
    patience: int = 2  # validations without a better metric before stopping
    loss: EncoderLoss = EncoderLoss.AUTO
    scale: float = 20.0  # cosines are multiplied by this in both losses (a temperature of 0.05)
    hard_negatives: int = 1  # mined per positive pair from the bundle (positives-only data)
    mine_depth: int = 30  # mined from this many nearest titles, positives and near-duplicates of them excluded
    false_negative_margin: float = MARGIN  # mined titles within this share of the weakest positive are skipped
    valid_pool: int = 2000  # titles besides the validation positives that validation retrieval ranks
    mixed_precision: bool = True  # bfloat16 autocast where the CPU (or CUDA) runs it natively
    valid_fraction: float = 0.1  # of the training queries, when no validation pairs are given
    # the fine-tuned weights' share in the published encoder: each weight is (1 - mix) * start + mix * tuned
    # (WiSE-FT, Wortsman et al. 2022). Where the labelled pairs are unlike what is searched, the whole fine-tune loses
    # to the start, and no validation split sees it. 7 fine-tunes, 11 test sets (scripts/eval_mix.py), change against
    # the start in points, mean / worst, and the worst regret against each test's best mix: mix 1 +2.95 / -4.32
    # (all-MiniLM-L6-v2 on LCQMC dev, tested on LCQMC test) / -6.61; 0.8 +3.13 / -1.56 / -3.85; 0.7 +3.11 / -0.28
    # (STS-B captions after the other genres) / -2.35; 0.6 +2.93 / -0.12 / -2.83; 0.5 +2.79 / +0.02 / -3.99
    mix: float = 0.7
    seed: int = 0
    query_column: str = "query"
    title_column: str = "title"
    label_column: str = "label"

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 2 or self.lr <= 0 or self.scale <= 0:
            raise ConfigError("epochs >= 0 (0: automatic), batch_size >= 2, lr > 0 and scale > 0 are required")
        if self.evals_per_epoch < 1 or self.patience < 1 or self.hard_negatives < 0 or self.mine_depth < 1:
            raise ConfigError(
                "evals_per_epoch >= 1, patience >= 1, hard_negatives >= 0 and mine_depth >= 1 are required"
            )
        if self.valid_pool < 0 or not 0 < self.valid_fraction < 1:
            raise ConfigError("valid_pool >= 0 and 0 < valid_fraction < 1 are required")
        if self.false_negative_margin < 0:
            raise ConfigError(f"false_negative_margin must be >= 0, got {self.false_negative_margin}")
        if not 0 < self.mix <= 1:
            raise ConfigError(f"mix (the fine-tuned weights' share) must be in (0, 1], got {self.mix}")


# epochs=0 trains for at least this many steps (2 to 10 epochs). STS-B's 5,749 pairs make 360 steps an epoch, so 2;
# SciFact's 818 train pairs 52, and 2 epochs (104 steps) left its validation nDCG still rising (0.8299 -> 0.8315).
MIN_STEPS = 300


def epochs_for(cfg: FinetuneConfig, steps_per_epoch: int) -> int:
    """The configured epochs, or (``epochs=0``) enough for :data:`MIN_STEPS` steps, between 2 and 10."""
    return cfg.epochs or max(2, min(10, math.ceil(MIN_STEPS / steps_per_epoch)))


# searched by `finetune_encoder(search=N)`: the settings a fine-tune is most sensitive to
DEFAULT_SPACE: dict[str, list[Any]] = {"lr": [1e-5, 2e-5, 3e-5, 5e-5], "batch_size": [16, 32], "warmup": [0.05, 0.1]}


def pick_loss(labels: np.ndarray, asked: EncoderLoss) -> tuple[EncoderLoss, str]:
    """The loss for these labels, and why."""
    positives_only = bool(np.all(labels > 0))
    if asked is EncoderLoss.COSENT and len(np.unique(labels)) < 2:
        raise ConfigError("the cosent loss needs at least two different labels; these pairs all have one")
    if asked is EncoderLoss.MNRL and not np.any(labels > 0):
        raise ConfigError("the mnrl loss trains on positive pairs (label > 0); there are none")
    if asked is not EncoderLoss.AUTO:
        return asked, "asked for"
    if positives_only:
        return EncoderLoss.MNRL, "every label is positive: in-batch and mined negatives"
    if set(np.unique(labels).tolist()) <= {0.0, 1.0}:
        return EncoderLoss.COSENT, "0/1 labels: each positive pair ranked above each negative pair of its batch"
    return EncoderLoss.COSENT, f"graded labels ({len(np.unique(labels))} values): pairs ranked by label"


# -- validation


def _pairs_metric(valid: pd.DataFrame) -> Callable[[Encoder], float]:
    """Spearman between the cosine and the label on the validation pairs (graded and 0/1 labels)."""
    queries, titles = valid["query"].tolist(), valid["title"].tolist()

    def cosines(encoder: Encoder) -> np.ndarray:
        values: np.ndarray = np.einsum("ij,ij->i", encoder.encode_queries(queries), encoder.encode_titles(titles))
        return values

    return pair_validator(valid["label"].to_numpy(), cosines, PairMetric.SPEARMAN)


def _retrieval_metric(snap: Snapshot | None, valid: pd.DataFrame, pool: int, seed: int) -> Callable[[Encoder], float]:
    """nDCG@10 of the validation queries over their positives plus up to ``pool`` other titles of the bundle."""
    positives = valid[valid["label"] > 0]
    texts = list(dict.fromkeys(positives["title"]))
    if snap is not None and pool:
        rows = snap.store.live_ids()
        rng = np.random.default_rng(seed)
        picked = rows[np.sort(rng.choice(len(rows), min(len(rows), pool), replace=False))]
        texts = list(dict.fromkeys(texts + [r.title for r in snap.store.get(picked.tolist())]))
    rel: dict[str, dict[str, int]] = {}
    for q, t in zip(positives["query"], positives["title"], strict=True):
        rel.setdefault(q, {})[t] = 1
    queries = list(rel)

    def rank(encoder: Encoder) -> list[list[str]]:
        t = encoder.encode_titles(texts)
        q = encoder.encode_queries(queries)
        top = np.argsort(-(q @ t.T), axis=1)[:, :10]
        return [[texts[j] for j in row] for row in top]

    return ndcg_validator([rel[q] for q in queries], rank)


# -- training data


def _mine(
    snap: Snapshot, train: pd.DataFrame, positives: dict[str, set[str]], cfg: FinetuneConfig
) -> dict[str, list[str]]:
    """Per query, the titles of its mined negatives (:func:`~matching.training.mining.mine_negatives`: exact
    cosines of the serving query encoder, near-positives left out), the ``5 x hard_negatives`` nearest: each epoch
    draws its negatives from these."""
    rows = positive_rows(snap, train)
    queries = list(rows)
    if not queries:
        return {}
    mined = mine_negatives(
        snap,
        snap.query_encoder.encode_queries(queries),
        [set(rows[q]) for q in queries],
        count=max(cfg.hard_negatives, 1) * 5,
        depth=cfg.mine_depth,
        margin=cfg.false_negative_margin,
    )
    found = sorted({r for negatives in mined for r in negatives})
    text = {r: row.title for r, row in zip(found, snap.store.get(found), strict=True)}
    # a title stored twice is one positive: its other row is no negative either
    return {
        q: [text[r] for r in negatives if text[r] not in positives[q]]
        for q, negatives in zip(queries, mined, strict=True)
    }


def _embed_pairs(encoder: Encoder, queries: list[str], titles: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable query and title vectors, each after its prompt as inference puts it (a checkpoint's
    "query: " / title prompt), so training sees the texts the towers will see."""
    prompts = encoder.prompts
    qv = encoder.embed(encoder.tokenize(encoder.prompted(queries, prompts.query))).float()
    tv = encoder.embed(encoder.tokenize(encoder.prompted(titles, prompts.title))).float()
    return qv, tv


def _mnrl_loss(
    encoder: Encoder, queries: list[str], titles: list[str], positives: dict[str, set[str]], loss: MNRLLoss
) -> torch.Tensor:
    """Each query over the batch's titles (its own positive first among them, and hard negatives after the
    positives); titles that are another positive of the query are masked out."""
    qv, tv = _embed_pairs(encoder, queries, titles)
    other = torch.tensor(
        [[j != i and titles[j] in positives[q] for j in range(len(titles))] for i, q in enumerate(queries)],
        device=qv.device,
    )
    return loss(qv, tv, other)


def _cosent(
    encoder: Encoder, queries: list[str], titles: list[str], labels: torch.Tensor, loss: CoSENTLoss
) -> torch.Tensor:
    qv, tv = _embed_pairs(encoder, queries, titles)
    return loss((qv * tv).sum(dim=-1), labels.to(qv.device))


def _batch_losses(
    tower: Encoder,
    train: pd.DataFrame,
    positives: dict[str, set[str]],
    mined: dict[str, list[str]],
    cfg: FinetuneConfig,
    rng: np.random.Generator,
) -> dict[EncoderLoss, Callable[[np.ndarray], torch.Tensor]]:
    """Per loss, the loss of a batch (row numbers of ``train``)."""
    queries, titles = train["query"].tolist(), train["title"].tolist()
    labels = torch.tensor(train["label"].to_numpy(), dtype=torch.float32)
    mnrl, cosent = MNRLLoss(cfg.scale), CoSENTLoss(1.0 / cfg.scale)

    def mnrl_batch(idx: np.ndarray) -> torch.Tensor:
        bq = [queries[i] for i in idx]
        bt = [titles[i] for i in idx]
        for q in bq:  # hard_negatives mined negatives per query, a different draw each epoch
            if mined.get(q):
                pool = mined[q]
                bt += [pool[int(k)] for k in rng.choice(len(pool), min(len(pool), cfg.hard_negatives), replace=False)]
        return _mnrl_loss(tower, bq, bt, positives, mnrl)

    def cosent_batch(idx: np.ndarray) -> torch.Tensor:
        return _cosent(tower, [queries[i] for i in idx], [titles[i] for i in idx], labels[idx], cosent)

    return {EncoderLoss.MNRL: mnrl_batch, EncoderLoss.COSENT: cosent_batch}


def _validation(
    snap: Snapshot | None, valid: pd.DataFrame, loss_kind: EncoderLoss, cfg: FinetuneConfig
) -> tuple[Callable[[Encoder], float], str]:
    """The validator and its metric's name: retrieval nDCG@10 for positives-only training, else Spearman."""
    if loss_kind is EncoderLoss.MNRL:
        if not (valid["label"] > 0).any():
            raise SchemaError("the validation pairs have no positive (label > 0): retrieval cannot be measured")
        return _retrieval_metric(snap, valid, cfg.valid_pool, cfg.seed), "ndcg@10"
    if len(np.unique(valid["label"])) < 2:
        raise SchemaError("the validation pairs all have one label: Spearman cannot be measured")
    return _pairs_metric(valid), "spearman"


def _training_pairs(
    snap: Snapshot | None, train: pd.DataFrame, loss_kind: EncoderLoss, cfg: FinetuneConfig
) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """Each query's positive titles, and (positives-only training with a bundle) its mined negatives' titles."""
    positives: dict[str, set[str]] = {}
    for q, t in zip(train["query"], train["title"], strict=True):
        positives.setdefault(q, set()).add(t)
    if snap is None or loss_kind is not EncoderLoss.MNRL or not cfg.hard_negatives:
        return positives, {}
    return positives, _mine(snap, train, positives, cfg)


def _optimisation(tower: Encoder, cfg: FinetuneConfig, total_steps: int) -> Optimisation:
    return Optimisation(
        [p for p in tower.model.parameters() if p.requires_grad],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        total_steps=total_steps,
        warmup=cfg.warmup,
        clip=cfg.clip,
        autocast=torch.bfloat16 if cfg.mixed_precision and bf16_training(tower.device) else None,
        device=tower.device,
    )


# -- the loop


def finetune_encoder(
    snap: Snapshot | None,
    encoder: Encoder,
    train_pairs: pd.DataFrame | str | Path,
    valid_pairs: pd.DataFrame | str | Path | None = None,
    *,
    config: FinetuneConfig | None = None,
    show_progress: bool = True,
    **settings: Any,
) -> tuple[Encoder, TrainReport]:
    """Fine-tune a copy of ``encoder`` on labelled pairs; returns the best copy (the starting weights when no
    validation beat them: ``report.best_epoch == 0``) and a report. ``snap``, the bundle being served, supplies
    mined negatives and the validation pool for positives-only pairs (``None``: in-batch negatives only)."""
    cfg = configured(FinetuneConfig, config, settings)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    train, valid = train_valid_pairs(train_pairs, valid_pairs, cfg)
    loss_kind, reason = pick_loss(train["label"].to_numpy(), cfg.loss)
    if loss_kind is EncoderLoss.MNRL:
        train = train[train["label"] > 0].reset_index(drop=True)
    validate, metric_name = _validation(snap, valid, loss_kind, cfg)
    positives, mined = _training_pairs(snap, train, loss_kind, cfg)

    tower = encoder.clone(source=encoder.source)
    baseline = validate(tower)  # in the encoder's own preset: the metric as it will serve
    report = TrainReport(
        config=cfg.to_dict(),
        loss=loss_kind.value,
        metric=metric_name,
        baseline=baseline,
        best_metric=baseline,
        best_epoch=0,
        train_pairs=len(train),
        valid_queries=valid["query"].nunique(),
        loss_reason=reason,
    )
    stopper = EarlyStopping(tower.model, report, cfg.patience)
    model = tower.model
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    epochs = epochs_for(cfg, per_epoch)
    report.config["epochs_run"] = epochs
    optimisation = _optimisation(tower, cfg, per_epoch * epochs)
    checks = {min(per_epoch, math.ceil(per_epoch * (k + 1) / cfg.evals_per_epoch)) for k in range(cfg.evals_per_epoch)}
    rng = np.random.default_rng(cfg.seed)
    batch_loss = _batch_losses(tower, train, positives, mined, cfg, rng)[loss_kind]
    bar = progress.bar(show_progress, total=per_epoch * epochs, desc="fine-tuning encoder", unit="batch")
    stop = False
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(train))
        running, seen = 0.0, 0
        model.train()
        for step in range(1, per_epoch + 1):
            idx = order[(step - 1) * cfg.batch_size : step * cfg.batch_size]
            with optimisation.autocast():
                loss = batch_loss(idx)
            running += optimisation.update(loss) * len(idx)
            seen += len(idx)
            bar.update(1)
            if step in checks:
                model.eval()
                value = validate(tower)
                bar.set_postfix(loss=f"{running / seen:.4f}", **{metric_name: f"{value:.4f}"})
                stop = stopper.check(round(epoch - 1 + step / per_epoch, 3), running / seen, value)
                model.train()
                if stop:
                    break
        if stop:
            break
    bar.close()
    stopper.restore(started)
    if cfg.mix < 1 and report.best_epoch > 0:
        _mix(tower, encoder, cfg.mix, validate, report)
    tower.tuned = encoder.tuned or report.best_epoch > 0
    return tower, report


def mix_weights(
    model: torch.nn.Module, start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], mix: float
) -> None:
    """Set ``model``'s floating-point weights to ``(1 - mix) * start + mix * tuned`` (state dicts of its shape;
    ``tuned`` may be ``model``'s own)."""
    done: set[int] = set()  # a weight two modules share is listed under each name: mixed once
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and tensor.data_ptr() not in done:
                done.add(tensor.data_ptr())
                tensor.copy_((1.0 - mix) * start[name] + mix * tuned[name])


def _mix(tower: Encoder, start: Encoder, mix: float, validate: Callable[[Encoder], float], report: TrainReport) -> None:
    """Interpolate ``tower``'s weights towards ``start``'s (``FinetuneConfig.mix``); the mixture is validated, and
    where it does not beat the starting weights they are kept (``report.best_epoch`` 0)."""
    before = start.model.state_dict()
    mix_weights(tower.model, before, tower.model.state_dict(), mix)
    mixed = validate(tower)
    report.compared = {"start": report.baseline, "tuned": report.best_metric, f"mix {mix:g}": mixed}
    if mixed <= report.baseline:
        tower.model.load_state_dict(before)
        report.best_epoch, report.best_metric, report.chosen = 0, report.baseline, "start"
        return
    report.best_metric, report.chosen = mixed, f"mix {mix:g}"


def search_finetune(
    snap: Snapshot | None,
    encoder: Encoder,
    train_pairs: pd.DataFrame | str | Path,
    valid_pairs: pd.DataFrame | str | Path | None = None,
    *,
    trials: int = 4,
    space: dict[str, list[Any]] | None = None,
    seed: int = 0,
    show_progress: bool = True,
    **settings: Any,
) -> tuple[Encoder, TrainReport, SearchReport]:
    """Random search over ``space`` (default :data:`DEFAULT_SPACE`), one fine-tune per trial; the best encoder."""

    def run(trial: dict[str, Any]) -> tuple[Encoder, TrainReport]:
        merged = {**settings, "seed": seed, **trial}
        return finetune_encoder(snap, encoder, train_pairs, valid_pairs, show_progress=show_progress, **merged)

    return random_search(run, dict(space or DEFAULT_SPACE), trials=trials, seed=seed, show_progress=show_progress)
