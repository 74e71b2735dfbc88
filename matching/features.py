"""Lexical features of (query, title) pairs and the label-free fusion of dense and lexical scores.

The fused score is ``w * cosine + (1 - w) * bm25 / best``, where ``best`` is the query's best BM25 over the
titles searched (so the lexical part is 1 for the best lexical match, whatever the query's length) and ``w`` is the
dense weight. It needs no labels, is the same for a pair whatever other candidates a query has, and is what an
untrained reranker scores, so retrieval, reranking and pair scoring agree until the reranker is trained.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import numpy as np

from matching.analysis import analyze
from matching.lexical import LexicalIndex

# bm25 / best, share of the query's terms in the title, character-bigram Jaccard, term-count ratio
LEXICAL_FEATURES = 4
# dense weight of the untrained fusion: an even split, not tuned on any data set (SciFact test nDCG@10: dense 0.645,
# BM25 0.691, this fusion 0.732)
DEFAULT_DENSE_WEIGHT = 0.5


def fuse(dense: np.ndarray, lexical: np.ndarray, dense_weight: float) -> np.ndarray:
    """The fused score of pairs from their cosine and normalised BM25 (both arrays of one shape)."""
    out: np.ndarray = (dense_weight * dense + (1.0 - dense_weight) * lexical).astype(np.float32)
    return out


def best_bm25(lexical: LexicalIndex, queries: Sequence[str], allowed: np.ndarray | None = None) -> np.ndarray:
    """Each query's best BM25 over the index's live titles (``allowed`` ones, if given): the normaliser of the
    lexical part. A query sharing no term with any title gets its upper bound (so unseen titles still score)."""
    top, _ = lexical.search(list(queries), 1, allowed)
    return normalisers(lexical, queries, top[:, 0])


def normalisers(lexical: LexicalIndex, queries: Sequence[str], top: np.ndarray) -> np.ndarray:
    """:func:`best_bm25` from each query's top BM25 score already found (``-inf`` or 0 where it matched nothing)."""
    best = np.asarray(top, dtype=np.float64).copy()
    for i in np.flatnonzero(~(best > 0)):
        best[i] = lexical.max_score(queries[int(i)]) or 1.0
    return best


def normalised(bm25: np.ndarray, best: float) -> np.ndarray:
    out: np.ndarray = np.clip(np.asarray(bm25, dtype=np.float64) / best, 0.0, 1.0).astype(np.float32)
    return out


def _bigrams(text: str) -> set[str]:
    chars = "".join(unicodedata.normalize("NFKC", text).casefold().split())
    return {chars[i : i + 2] for i in range(len(chars) - 1)} or ({chars} if chars else set())


def pair_features(
    lexical: LexicalIndex, query: str, titles: Sequence[str], bm25: np.ndarray, best: float
) -> np.ndarray:
    """``(len(titles), LEXICAL_FEATURES)`` float32 features of ``query`` against each title, given their BM25."""
    out = np.zeros((len(titles), LEXICAL_FEATURES), dtype=np.float32)
    out[:, 0] = normalised(bm25, best)
    q_terms = set(analyze(query, lexical.analyzer))
    q_grams = _bigrams(query)
    for i, title in enumerate(titles):
        t_terms = analyze(title, lexical.analyzer)
        t_set = set(t_terms)
        if q_terms:
            out[i, 1] = len(q_terms & t_set) / len(q_terms)
        t_grams = _bigrams(title)
        union = len(q_grams | t_grams)
        out[i, 2] = len(q_grams & t_grams) / union if union else 0.0
        longer = max(len(q_terms), len(t_set))
        out[i, 3] = min(len(q_terms), len(t_set)) / longer if longer else 1.0
    return out
