"""Lexical features of (query, title) pairs and the label-free fusion of dense and lexical scores.

The fused score is ``w * cosine + (1 - w) * min(1, bm25(q, t) / bm25(q, q))``: the lexical part is the share of its
own BM25 the query reaches against the title (1 for the query's own text, whatever its length; the catalogue's
statistics weigh the words), and ``w`` is the dense weight. It needs no labels, is the same for a pair whatever
other candidates a query has, and is what an untrained reranker scores, so retrieval, reranking and pair scoring
agree until the reranker is trained.

The adaptive rule (every bundle built since; older ones keep their fixed ``w``) sets, per pair,
``w = ceiling * known * (floor + (1 - floor) * ratio)``: ``known`` is the share of the query's tokens the encoder
has in its vocabulary (not ``[UNK]``), ``ratio`` the shorter side's distinct terms over the longer side's. The dense
side counts as much as the encoder can read the query, and most between texts of like length (sentence against
sentence, where the lexical share mostly repeats what the cosine knows), least for a short query against a long
document (where BM25 is strongest). The cosine enters centred on the catalogue's mean cosine (:func:`centred`), so
an encoder whose cosines all sit near 0.8 weighs as one whose unrelated texts sit near 0. A bundle records its
ceiling and floor (those of the first rule, 0.85 and 0.5, where it recorded no floor).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import numpy as np

from matching.analysis import analyze
from matching.lexical import LexicalIndex

# bm25 / the query's own bm25, share of the query's terms in the title, character-bigram Jaccard, term-count ratio
LEXICAL_FEATURES = 4
# the fixed dense weight of bundles built before the adaptive rule (SciFact test nDCG@10: dense 0.645, BM25 0.691,
# this fusion 0.732; STS-B test Spearman 0.810 against 0.820 for the cosine alone)
DEFAULT_DENSE_WEIGHT = 0.5
# The adaptive rule's ceiling and floor, chosen by the worst gap to the better single signal over the pair sets at
# once, with SciFact's nDCG@10 kept >= 0.73 (per-pair signals of scripts/eval_hybrid.py and eval_multilingual.py;
# BENCHMARKS.md). The first rule (ceiling 0.85, floor 0.5) lost 1.9 points to the cosine on LCQMC dev with
# multilingual-e5-small (0.8750 against 0.8936) and 0.8 on STS-B's captions. Ceiling 1.0, floor 0.35: worst gap -0.5
# (e5 LCQMC dev 0.8881), captions 0.9169 (cosine 0.9217), STS-B test 0.8219, MRPC 0.7467, LCQMC (English model)
# 0.8448, SciFact 0.7333. SciFact is noisy in the floor (0.7298 at 0.40, 0.7334 at 0.30); ceiling 0.95 gives a
# worst gap of -0.8 to -1.0.
DENSE_CEILING = 1.0
DENSE_FLOOR = 0.35
# the floor of bundles built under the first adaptive rule, which did not record it
FIRST_DENSE_FLOOR = 0.5


def fuse(dense: np.ndarray, lexical: np.ndarray, dense_weight: float | np.ndarray) -> np.ndarray:
    """The fused score of pairs from their cosine and normalised BM25 (both arrays of one shape; the weight one
    number or one per pair)."""
    out: np.ndarray = (dense_weight * dense + (1.0 - dense_weight) * lexical).astype(np.float32)
    return out


def query_norms(lexical: LexicalIndex, queries: Sequence[str]) -> np.ndarray:
    """Each query's BM25 against its own text as a title (1 where it has no terms): the lexical part's normaliser.
    Against dividing by the query's best BM25 in the catalogue, it lifts the untrained LCQMC test ROC-AUC from 0.684
    to 0.802 (SciFact nDCG@10 0.732 -> 0.733), and a pair's score depends on the pair alone."""
    norms = np.array([float(lexical.score_texts(q, [q])[0]) for q in queries], dtype=np.float64)
    return np.where(norms > 0, norms, 1.0)


def centred(dense: np.ndarray, centre: float) -> np.ndarray:
    """Cosines re-scaled so the catalogue's mean cosine (``centre``) reads 0 and identity 1: ``(cos - c) / (1 - c)``.
    Encoders differ in how far apart unrelated texts sit (all-MiniLM-L6-v2: 0.03 on STS-B's sentences;
    multilingual-e5-small: 0.83 on LCQMC's, where every cosine falls in 0.8-1): centred, a cosine weighs against the
    lexical share alike for both."""
    if not centre:
        return np.asarray(dense, dtype=np.float32)
    out: np.ndarray = ((np.asarray(dense, dtype=np.float64) - centre) / (1.0 - centre)).astype(np.float32)
    return out


def adaptive_weights(known: float | np.ndarray, ratio: np.ndarray, ceiling: float, floor: float) -> np.ndarray:
    """Per pair, the adaptive rule's dense weight: ``ceiling * known * (floor + (1 - floor) * ratio)``."""
    share = floor + (1.0 - floor) * np.asarray(ratio, dtype=np.float64)
    out: np.ndarray = (ceiling * np.asarray(known, dtype=np.float64) * share).astype(np.float32)
    return out


def length_ratio(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per pair, the smaller of two distinct-term counts over the larger (1 when both are 0), as feature 3."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    longer = np.maximum(a, b)
    out: np.ndarray = np.where(longer > 0, np.minimum(a, b) / np.maximum(longer, 1), 1.0).astype(np.float32)
    return out


def normalised(bm25: np.ndarray, norm: float) -> np.ndarray:
    out: np.ndarray = np.clip(np.asarray(bm25, dtype=np.float64) / norm, 0.0, 1.0).astype(np.float32)
    return out


def _bigrams(text: str) -> set[str]:
    chars = "".join(unicodedata.normalize("NFKC", text).casefold().split())
    return {chars[i : i + 2] for i in range(len(chars) - 1)} or ({chars} if chars else set())


def pair_features(
    lexical: LexicalIndex,
    query: str,
    titles: Sequence[str],
    bm25: np.ndarray,
    norm: float,
    known: float | None = None,
) -> np.ndarray:
    """``(len(titles), LEXICAL_FEATURES)`` float32 features of ``query`` against each title, given their BM25; with
    ``known`` (the query's known-token share, for the adaptive fusion) one more column holding it."""
    out = np.zeros((len(titles), LEXICAL_FEATURES + (known is not None)), dtype=np.float32)
    if known is not None:
        out[:, LEXICAL_FEATURES] = known
    out[:, 0] = normalised(bm25, norm)
    q_terms = set(analyze(query, lexical.analyzer, lexical.fold))
    q_grams = _bigrams(query)
    for i, title in enumerate(titles):
        t_terms = analyze(title, lexical.analyzer, lexical.fold)
        t_set = set(t_terms)
        if q_terms:
            out[i, 1] = len(q_terms & t_set) / len(q_terms)
        t_grams = _bigrams(title)
        union = len(q_grams | t_grams)
        out[i, 2] = len(q_grams & t_grams) / union if union else 0.0
        longer = max(len(q_terms), len(t_set))
        out[i, 3] = min(len(q_terms), len(t_set)) / longer if longer else 1.0
    return out
