"""Positives and hard negatives for every trainer (reranker, query tower, encoder fine-tune): one map from a query
to its positive rows, and one miner with one rule.

The rule: a query's negatives are the bundle's titles nearest to its vector by EXACT cosine (the stored float32
vectors, never a lossy index's distances), leaving out its positives and every title scoring within ``margin``
(relative) of its weakest positive: those are likely positives nobody labelled (sentence-transformers'
``relative_margin`` in ``mine_hard_negatives``)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matching.search import Snapshot

# the default relative margin: a title scoring above 95% of the weakest positive's cosine is not mined
MARGIN = 0.05


def positive_rows(snap: Snapshot, pairs: pd.DataFrame) -> dict[str, list[int]]:
    """Row ids of each query's positive titles (label > 0), in pair order; titles not in the bundle are left out
    (there is no vector to train or mine against), and so are queries with none in it."""
    rows = snap.store.find_titles(pairs["title"].tolist())
    out: dict[str, list[int]] = {}
    for q, row, label in zip(pairs["query"], rows, pairs["label"], strict=True):
        if label > 0 and row is not None:
            out.setdefault(str(q), []).append(int(row))
    return out


def mine_negatives(
    snap: Snapshot,
    vectors: np.ndarray,
    positives: Sequence[Collection[int]],
    *,
    count: int,
    depth: int,
    margin: float | None = MARGIN,
) -> list[list[int]]:
    """Per query (a row of ``vectors``, its positive row ids in ``positives``), up to ``count`` negative row ids,
    the highest exact cosine first, from the ``depth`` nearest titles. A query without a positive in the bundle
    gets none: nothing tells its hard negatives from its unlabelled positives. ``margin=None`` leaves out the
    positives only."""
    if count <= 0 or not len(vectors):
        return [[] for _ in positives]
    stored = snap.store.vectors
    # with the stored vectors a lossy index re-scores a wider candidate set exactly: better recall of the top depth
    _, ids = snap.index.search(vectors, depth, stored=stored)
    out: list[list[int]] = []
    for qv, found, pos in zip(vectors, ids, positives, strict=True):
        if not pos:
            out.append([])
            continue
        weakest = float(np.min(np.asarray(stored[sorted(pos)]) @ qv))
        limit = math.inf if margin is None else weakest - margin * abs(weakest)
        candidates = found[found >= 0]
        exact = np.asarray(stored[candidates]) @ qv
        order = np.argsort(-exact, kind="stable")
        kept = [int(candidates[j]) for j in order if exact[j] < limit and int(candidates[j]) not in pos]
        out.append(kept[:count])
    return out
