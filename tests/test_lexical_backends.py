"""The behaviour every lexical backend owes the bundle (top-k against a brute-force BM25, scoring given texts with
this index's or a larger catalogue's statistics, add/remove, filtered search, compaction, save/load), run over each
registered backend, a test-only one included: a new backend is one module plus one ``register`` line, as
``DictLexical`` below shows."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pytest

from matching.analysis import Analyzer, analyze, counted
from matching.errors import BundleError, ConfigError
from matching.layout import LEXICAL_CONFIG
from matching.lexical import BM25Params, LexicalIndex, TermStats, lexical_backends, register

PARAMS = BM25Params()


def _bm25(query: Sequence[str], terms: Sequence[str], stats: TermStats, params: BM25Params = PARAMS) -> float:
    """BM25 of a title's ``terms`` for the distinct ``query`` terms, straight from the formula."""
    tf, total = Counter(terms), 0.0
    for term in set(query):
        if tf[term]:
            df = stats.df.get(term, 0)
            idf = math.log1p((stats.live - df + 0.5) / (df + 0.5))
            norm = params.k1 * (1 - params.b + params.b * len(terms) / stats.avgdl)
            total += idf * tf[term] * (params.k1 + 1) / (tf[term] + norm)
    return total


class DictLexical(LexicalIndex):
    """A test-only backend: each row's terms in a list (None: dead), every query scored against every row."""

    files: ClassVar[tuple[str, ...]] = ()  # everything lives in its record, lexical.json

    def __init__(self, analyzer: Analyzer, params: BM25Params, fold: int, docs: list[list[str] | None]) -> None:
        super().__init__(analyzer, params, fold)
        self.docs = docs

    @classmethod
    def create_empty(cls, analyzer: Analyzer, params: BM25Params, fold: int) -> Self:
        return cls(analyzer, params, fold, [])

    @classmethod
    def read(cls, directory: Path, meta: Any) -> Self:
        return cls(Analyzer(meta["analyzer"]), BM25Params(**meta["params"]), meta["fold"], meta["docs"])

    def write(self, directory: Path) -> dict[str, Any]:
        params = {"k1": self.params.k1, "b": self.params.b}
        return {"analyzer": self.analyzer.value, "params": params, "fold": self.fold, "docs": self.docs}

    def add(self, row_ids: np.ndarray, titles: Sequence[str]) -> None:
        for row, title in zip(row_ids.tolist(), titles, strict=True):
            self.grow(row)
            self.docs.append(self.terms(title))

    def grow(self, rows: int) -> None:
        self.docs += [None] * (rows - len(self.docs))

    def remove(self, row_ids: np.ndarray) -> None:
        for row in row_ids.tolist():
            self.docs[row] = None

    def compacted(self) -> DictLexical:
        return DictLexical(self.analyzer, self.params, self.fold, [d for d in self.docs if d is not None])

    @property
    def rows(self) -> int:
        return len(self.docs)

    @property
    def count(self) -> int:
        return sum(d is not None for d in self.docs)

    def statistics(self, terms: Iterable[str]) -> TermStats:
        live = [d for d in self.docs if d is not None]
        df = {t: sum(t in d for d in live) for t in set(terms)}
        return TermStats(len(live), sum(len(d) for d in live), df)

    def _scores(self, query: str, docs: Sequence[list[str] | None], stats: TermStats | None) -> np.ndarray:
        q = self.terms(query)
        stats = stats or self.statistics(q)
        return np.array([0.0 if d is None else _bm25(q, d, stats, self.params) for d in docs], dtype=np.float32)

    def search(
        self, queries: Sequence[str], k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        for i, query in enumerate(queries):
            values = self._scores(query, self.docs, None)
            rows = [r for r in np.flatnonzero(values > 0) if allowed is None or allowed[r]]
            top = sorted(rows, key=lambda r: (-values[r], r))[:k]
            scores[i, : len(top)], ids[i, : len(top)] = values[top], top
        return scores, ids

    def score_rows(self, query: str, row_ids: np.ndarray) -> np.ndarray:
        docs = [self.docs[r] if 0 <= r < self.rows else None for r in row_ids.reshape(-1).tolist()]
        return self._scores(query, docs, None).reshape(row_ids.shape)

    def score_texts(self, query: str, titles: Sequence[str], stats: TermStats | None = None) -> np.ndarray:
        return self._scores(query, [self.terms(t) for t in titles], stats)

    def max_score(self, query: str, stats: TermStats | None = None) -> float:
        q = set(self.terms(query))
        stats = stats or self.statistics(q)
        return float(sum(math.log1p((stats.live - stats.df[t] + 0.5) / (stats.df[t] + 0.5)) for t in q) * 2.2)

    def distinct_terms(self, row_ids: np.ndarray) -> np.ndarray:
        docs = [self.docs[r] if 0 <= r < self.rows else None for r in row_ids.tolist()]
        return np.array([len(counted(d)) if d else 0 for d in docs], dtype=np.int64)


register("dict", DictLexical)  # the one registry line a new backend needs

BACKENDS = lexical_backends()
COLOURS = ["red", "blue", "black", "green", "white"]
THINGS = ["running shoes", "leather belt", "wireless headphones", "water bottle", "kitchen knife", "wool socks"]
EXTRAS = ["", "for men", "for women", "pack of 6", "with case", "large"]
TITLES = [f"{c} {t} {e}".strip() for c in COLOURS for t in THINGS for e in EXTRAS][::3]
QUERIES = ["red running shoes", "wireless headphones with case", "black leather", "socks pack", "kitchen", "nothing"]


def test_the_suite_covers_the_built_in_backend_and_the_test_one() -> None:
    assert {"bm25", "dict"} <= set(BACKENDS)


def _build(name: str, titles: Sequence[str] | Sequence[tuple[int, str]] = TITLES, **kwargs: Any) -> LexicalIndex:
    return LexicalIndex.build(titles, Analyzer.ENGLISH, backend=name, **kwargs)


def _reference(query: str, live: dict[int, str]) -> dict[int, float]:
    """BM25 of every live row sharing a term with ``query``, by brute force."""
    docs = {row: analyze(t, Analyzer.ENGLISH) for row, t in live.items()}
    q = analyze(query, Analyzer.ENGLISH)
    stats = TermStats(len(docs), sum(map(len, docs.values())), {t: sum(t in d for d in docs.values()) for t in q})
    scores = {row: _bm25(q, d, stats) for row, d in docs.items()}
    return {row: s for row, s in scores.items() if s > 0}


def _assert_top_k(index: LexicalIndex, live: dict[int, str], k: int, allowed: np.ndarray | None = None) -> None:
    scores, ids = index.search(QUERIES, k, allowed)
    for i, query in enumerate(QUERIES):
        want = {r: s for r, s in _reference(query, live).items() if allowed is None or allowed[r]}  # stats: all live
        best = sorted(want.values(), reverse=True)[:k]
        found = ids[i][ids[i] >= 0]
        np.testing.assert_allclose(scores[i, : len(found)], best, rtol=1e-5)
        np.testing.assert_allclose([want[r] for r in found.tolist()], best, rtol=1e-5)
        assert (ids[i, len(found) :] == -1).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_build_ranks_as_the_brute_force(name: str) -> None:
    index = _build(name)
    assert index.name == name
    assert (index.rows, index.count) == (len(TITLES), len(TITLES))
    _assert_top_k(index, dict(enumerate(TITLES)), 5)
    _assert_top_k(index, dict(enumerate(TITLES)), len(TITLES))


@pytest.mark.parametrize("name", BACKENDS)
def test_scores_of_given_texts_and_stored_rows_agree_with_search(name: str) -> None:
    index = _build(name)
    scores, ids = index.search(QUERIES, 8)
    for i, query in enumerate(QUERIES):
        found = ids[i][ids[i] >= 0]
        np.testing.assert_allclose(index.score_rows(query, found), scores[i, : len(found)], rtol=1e-6)
        texts = index.score_texts(query, [TITLES[r] for r in found.tolist()])
        np.testing.assert_allclose(texts, scores[i, : len(found)], rtol=1e-6)
        if len(found):
            assert index.max_score(query) >= float(scores[i, 0])
    assert index.score_rows("red", np.array([-1, len(TITLES)])).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", BACKENDS)
def test_a_part_scores_with_the_whole_catalogue_statistics(name: str) -> None:
    """Segments: each part scores as the whole does once given the statistics of all parts added up."""
    whole, half = _build(name), len(TITLES) // 2
    first, second = _build(name, TITLES[:half]), _build(name, TITLES[half:])
    for query in QUERIES:
        terms = first.terms(query)
        stats = first.statistics(terms) + second.statistics(terms)
        assert stats == whole.statistics(terms)
        np.testing.assert_allclose(first.score_texts(query, TITLES, stats), whole.score_texts(query, TITLES), rtol=1e-6)
        assert first.max_score(query, stats) == pytest.approx(whole.max_score(query), rel=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
def test_add_and_remove(name: str) -> None:
    index = _build(name, TITLES[:10])
    index.add(np.arange(12, len(TITLES), dtype=np.int64), TITLES[12:])  # rows 10 and 11 never live
    gone = np.array([0, 5, 13, 20], dtype=np.int64)
    index.remove(gone)
    live = {r: t for r, t in enumerate(TITLES) if r not in {10, 11, *gone.tolist()}}
    assert (index.rows, index.count) == (len(TITLES), len(live))
    assert index.statistics([]).live == len(live)
    _assert_top_k(index, live, len(TITLES))
    assert index.distinct_terms(np.array([0, 1, -1])).tolist()[1:] == [len(set(index.terms(TITLES[1]))), 0]


@pytest.mark.parametrize("name", BACKENDS)
def test_filtered_search_returns_allowed_rows_only(name: str) -> None:
    index = _build(name)
    allowed = np.zeros(len(TITLES), dtype=bool)
    allowed[::4] = True
    _, ids = index.search(QUERIES, 5, allowed)
    assert allowed[ids[ids >= 0]].all()
    _assert_top_k(index, dict(enumerate(TITLES)), 5, allowed)


@pytest.mark.parametrize("name", BACKENDS)
def test_compaction_renumbers_the_live_rows(name: str) -> None:
    index = _build(name, list(enumerate(TITLES)), rows=len(TITLES) + 3)
    assert index.rows == len(TITLES) + 3
    index.remove(np.arange(0, len(TITLES), 2, dtype=np.int64))
    compact = index.compacted()
    assert type(compact) is type(index)
    assert (compact.rows, compact.count) == (index.count, index.count)
    _assert_top_k(compact, dict(enumerate(TITLES[1::2])), 6)


@pytest.mark.parametrize("name", BACKENDS)
def test_save_and_load_reproduce_the_results(name: str, tmp_path: Path) -> None:
    index = _build(name)
    index.remove(np.array([1, 2], dtype=np.int64))
    index.save(tmp_path)
    assert json.loads((tmp_path / LEXICAL_CONFIG).read_text(encoding="utf-8"))["backend"] == name
    assert {p.name for p in tmp_path.iterdir()} == {LEXICAL_CONFIG, *type(index).files}
    loaded = LexicalIndex.load(tmp_path)
    assert type(loaded) is type(index)
    assert (loaded.rows, loaded.count, loaded.record()) == (index.rows, index.count, index.record())
    for a, b in zip(index.search(QUERIES, 7), loaded.search(QUERIES, 7), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.score_texts("red shoes", TITLES), index.score_texts("red shoes", TITLES))
    assert index.record()["backend"] == name


def test_a_backend_class_builds_itself() -> None:
    assert type(DictLexical.build(TITLES, Analyzer.ENGLISH)) is DictLexical


def test_an_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown lexical backend 'nope'"):
        _build("nope")


def test_a_record_naming_an_unregistered_backend_is_a_bundle_error(tmp_path: Path) -> None:
    _build("dict").save(tmp_path)
    meta = json.loads((tmp_path / LEXICAL_CONFIG).read_text(encoding="utf-8"))
    (tmp_path / LEXICAL_CONFIG).write_text(json.dumps({**meta, "backend": "gone"}), encoding="utf-8")
    with pytest.raises(BundleError, match=r"'gone', which is not registered"):
        LexicalIndex.load(tmp_path)


def test_a_record_without_a_backend_is_bm25(tmp_path: Path) -> None:
    """Bundles from before the backends: lexical.json has no ``backend``."""
    _build("bm25").save(tmp_path)
    meta = json.loads((tmp_path / LEXICAL_CONFIG).read_text(encoding="utf-8"))
    del meta["backend"]
    (tmp_path / LEXICAL_CONFIG).write_text(json.dumps(meta), encoding="utf-8")
    assert LexicalIndex.load(tmp_path).name == "bm25"
