"""Lexical features of (query, title) pairs and the label-free fusion of dense and lexical scores.

The fused score is ``w * cosine + (1 - w) * min(1, bm25(q, t) / bm25(q, q))``: the lexical part is the share of its
own BM25 the query reaches against the title (1 for the query's own text, whatever its length; the catalogue's
statistics weigh the words), and ``w`` is the dense weight. It needs no labels, is the same for a pair whatever
other candidates a query has, and is what an untrained reranker scores, so retrieval, reranking and pair scoring
agree until the reranker is trained.

The adaptive rule (every bundle built since; older ones keep their fixed ``w``) sets, per pair,
``w = ceiling * known ** power * (f + (1 - f) * ratio)`` with ``f = floor + (1 - floor) * lift``: ``known`` is the
share of the query's tokens the encoder has in its vocabulary (not ``[UNK]``), ``ratio`` the shorter side's distinct
terms over the longer side's, and ``lift = max(0, 1 - longer / span)`` grows as the longer side's distinct terms fall
below ``span``. The dense side counts as the encoder can read the query (less than in proportion: ``power`` > 1),
and most between texts of like length (sentence against sentence, where the lexical share mostly repeats what the
cosine knows) and between short texts (a few terms overlap or not in coarse steps, and a paraphrase shares few of
them), least for a short query against a long document (where BM25 is strongest). The cosine enters centred on the
catalogue's mean cosine (:func:`centred`), so an encoder whose cosines all sit near 0.8 weighs as one whose unrelated
texts sit near 0. A bundle records its ceiling, floor, span and power (those of the first rule, 0.85 and 0.5 and no
span, where it recorded no floor; span 0, no lift, where it recorded no span; power 1 where it recorded none).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from matching.analysis import analyze, counted
from matching.lexical import LexicalIndex
from matching.types import Fusion

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
# The span of the length lift, chosen the same way with ceiling and floor held (scripts/eval_fusion_rule.py, with
# STS-B dev and MRPC val as two more sets): at span 15 the worst gap is -0.44 (LCQMC test with the English model,
# 0.8432), captions 0.9204 against 0.9170 without the lift (cosine 0.9216), STS-B test 0.8245 against 0.8219,
# LCQMC dev with multilingual-e5-small 0.8901 against 0.8881 (its cosine 0.8936), MRPC 0.7464 against 0.7467 and
# SciFact 0.7345 with and without it (its documents run to ~90 terms). Spans 12 and 20 give -0.45 and -0.47.
DENSE_SPAN = 15.0
# The power of the known share in the rule. The cosine compares two texts of which the encoder reads about the known
# share each (the query's share stands for both), so it says less than the share alone suggests: with the English
# model on LCQMC (a quarter of the tokens read at the median) the untrained default at power 1 was 0.8429 test /
# 0.7558 dev ROC-AUC, under its lexical share on test (0.8492); at 1.5 0.8498 / 0.7565, at 2 0.8508 / 0.7554, at 3
# 0.8503 / 0.7538 (scripts/eval_fusion_rule.py). 1.5 is the one with no loss on either split; every other set here
# reads as good as every token (known share ~1) and moves by less than 0.0001.
KNOWN_POWER = 1.5
# the floor of bundles built under the first adaptive rule, which did not record it
FIRST_DENSE_FLOOR = 0.5


@dataclass(frozen=True)
class Fused:
    """The untrained fusion a score was computed with (:func:`fuse`): an untrained reranker of the same fusion would
    compute the same numbers again. ``weight`` is the fixed weight or the adaptive rule's ceiling."""

    fusion: Fusion
    weight: float
    floor: float
    centre: float
    span: float = 0.0
    power: float = 1.0


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


def adaptive_weights(
    known: float | np.ndarray,
    ratio: np.ndarray,
    ceiling: float,
    floor: float,
    lift: float | np.ndarray = 0.0,
    power: float = 1.0,
) -> np.ndarray:
    """Per pair, the adaptive rule's dense weight: ``ceiling * known ** power * (f + (1 - f) * ratio)``, where the
    floor ``f = floor + (1 - floor) * lift`` rises toward 1 with the length lift (:func:`length_lift`)."""
    f = floor + (1.0 - floor) * np.asarray(lift, dtype=np.float64)
    share = f + (1.0 - f) * np.asarray(ratio, dtype=np.float64)
    read = np.asarray(known, dtype=np.float64) ** power
    out: np.ndarray = (ceiling * read * share).astype(np.float32)
    return out


def length_ratio(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per pair, the smaller of two distinct-term counts over the larger (1 when both are 0), as feature 3."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    longer = np.maximum(a, b)
    out: np.ndarray = np.where(longer > 0, np.minimum(a, b) / np.maximum(longer, 1), 1.0).astype(np.float32)
    return out


def length_lift(first: np.ndarray, second: np.ndarray, span: float) -> np.ndarray:
    """Per pair, ``max(0, 1 - longer / span)`` of the two distinct-term counts (0 everywhere when ``span`` is 0: the
    bundles built before the lift), as the last feature column of bundles with a span."""
    if span <= 0:
        return np.zeros(np.broadcast(first, second).shape, dtype=np.float32)
    longer = np.maximum(np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64))
    out: np.ndarray = np.clip(1.0 - longer / span, 0.0, 1.0).astype(np.float32)
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
    span: float = 0.0,
) -> np.ndarray:
    """``(len(titles), LEXICAL_FEATURES)`` float32 features of ``query`` against each title, given their BM25; with
    ``known`` (the query's known-token share, for the adaptive fusion) one more column holding it, and with a
    ``span`` as well, one more after it holding the length lift (:func:`length_lift`)."""
    spanned = known is not None and span > 0
    out = np.zeros((len(titles), LEXICAL_FEATURES + (known is not None) + spanned), dtype=np.float32)
    if known is not None:
        out[:, LEXICAL_FEATURES] = known
    out[:, 0] = normalised(bm25, norm)
    q_terms = counted(analyze(query, lexical.analyzer, lexical.fold))
    q_grams = _bigrams(query)
    t_counts = np.zeros(len(titles), dtype=np.int64)
    for i, title in enumerate(titles):
        t_set = counted(analyze(title, lexical.analyzer, lexical.fold))
        t_counts[i] = len(t_set)
        if q_terms:
            out[i, 1] = len(q_terms & t_set) / len(q_terms)
        t_grams = _bigrams(title)
        union = len(q_grams | t_grams)
        out[i, 2] = len(q_grams & t_grams) / union if union else 0.0
    q_counts = np.full(len(titles), len(q_terms))
    out[:, 3] = length_ratio(q_counts, t_counts)
    if spanned:
        out[:, LEXICAL_FEATURES + 1] = length_lift(q_counts, t_counts, span)
    return out
