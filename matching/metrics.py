"""Pure metrics: ranking (trec_eval / pytrec_eval definitions), pair scoring, and ANN recall against exact search."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Qrels = Mapping[str, Mapping[str, int]]


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents (grade > 0) found in the top ``k``."""
    rel = {d for d, g in relevant.items() if g > 0}
    if not rel:
        return 0.0
    return len(rel.intersection(ranked[:k])) / len(rel)


def mrr_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Reciprocal rank of the first relevant document in the top ``k`` (0 if none)."""
    for i, doc in enumerate(ranked[:k]):
        if relevant.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """nDCG@k with linear gains (grade / log2(rank + 1)), as trec_eval's ``ndcg_cut`` computes it."""
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]) if relevant.get(doc, 0) > 0)
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mean_metrics(
    runs: Mapping[str, Sequence[str]], qrels: Qrels, k_values: Iterable[int] = (10, 100)
) -> dict[str, float]:
    """Mean nDCG@k, Recall@k for each k, and MRR@10, over the queries in ``qrels``.

    A query with no run counts as zeros, as trec_eval's ``-c`` flag does.
    """
    ks = sorted(set(k_values))
    totals: dict[str, float] = {f"ndcg@{k}": 0.0 for k in ks}
    totals.update({f"recall@{k}": 0.0 for k in ks})
    totals["mrr@10"] = 0.0
    queries = [q for q, rel in qrels.items() if any(g > 0 for g in rel.values())]
    for q in queries:
        ranked = runs.get(q, [])
        for k in ks:
            totals[f"ndcg@{k}"] += ndcg_at_k(ranked, qrels[q], k)
            totals[f"recall@{k}"] += recall_at_k(ranked, qrels[q], k)
        totals["mrr@10"] += mrr_at_k(ranked, qrels[q], 10)
    n = max(1, len(queries))
    return {name: value / n for name, value in totals.items()}


def neighbour_recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """ANN quality: mean fraction of each query's exact top ``k`` row ids (ignoring -1) found in its top ``k``."""
    hits, total = 0, 0
    for f, e in zip(found[:, :k], exact[:, :k], strict=True):
        truth = set(e[e >= 0].tolist())
        hits += len(truth.intersection(f[f >= 0].tolist()))
        total += len(truth)
    return hits / total if total else 1.0


def tied_neighbour_recall(
    found: np.ndarray, found_scores: np.ndarray, exact: np.ndarray, exact_scores: np.ndarray, k: int, tol: float = 1e-6
) -> float:
    """ANN quality that lets equal rows stand for each other: :func:`neighbour_recall`, where a found row also
    counts when its exact score (``found_scores``, -inf where none) reaches the query's k-th exact score less ``tol``
    (capped at the exact list's length). With duplicate titles (equal vectors) which of the equal rows the exact top
    ``k`` kept does not matter; without ties it is :func:`neighbour_recall`."""
    exact_ids = np.asarray(exact)[:, :k]
    top = np.asarray(exact_scores)[:, :k]
    if top.shape[1] == 0:
        return 1.0
    got, got_scores = np.asarray(found)[:, :k], np.asarray(found_scores)[:, :k]
    listed = (got[:, :, None] == exact_ids[:, None, :]).any(axis=2) & (got >= 0)
    tied = got_scores >= top[:, -1:] - tol
    total = (exact_ids >= 0).sum(axis=1)
    hits = np.minimum((listed | tied).sum(axis=1), total)
    return float(hits.sum() / total.sum()) if total.sum() else 1.0


# -- pair metrics


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((xc * xc).sum() * (yc * yc).sum()))
    return float((xc * yc).sum() / denom) if denom > 0 else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson over average ranks)."""
    return pearson(rankdata(x), rankdata(y))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve for 0/1 ``labels`` (ties count half), via the Mann-Whitney U statistic."""
    labels = np.asarray(labels) > 0
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold (predict 1 when score >= it) that maximises accuracy on these pairs."""
    labels = np.asarray(labels) > 0
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, y = np.asarray(scores)[order], labels[order]
    # predicting the top i as positive: correct = positives in top i + negatives below i
    correct = np.concatenate([[0], np.cumsum(y)]) + np.concatenate([[(~y).sum()], (~y).sum() - np.cumsum(~y)])
    # a threshold cannot split tied scores: only cuts between distinct scores (or at the ends) count
    valid = np.concatenate([[True], s[:-1] != s[1:], [True]])
    correct = np.where(valid, correct, -1)
    i = int(np.argmax(correct))
    if i == 0:
        return float(s[0]) + 1e-6
    if i == len(s):
        return float(s[-1])
    return float((s[i - 1] + s[i]) / 2.0)


def classification_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, F1 (positive class) and ROC-AUC at ``threshold``."""
    y = np.asarray(labels) > 0
    pred = np.asarray(scores) >= threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"accuracy": float((pred == y).mean()), "f1": f1, "roc_auc": roc_auc(y, scores)}
