"""The BM25 lexical backend: an inverted index that lives inside a bundle generation (terms from matching.analysis).

BM25 is the Lucene / BEIR-Elasticsearch form. For each distinct term t of the query (a repeated query term
counts once)::

    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    score  = sum_t idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))

N is the number of live rows, df(t) the live rows holding t, tf the count of t in the title, dl the title's
number of terms and avgdl the mean dl over live rows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
from safetensors.numpy import load_file, save_file

from matching.analysis import CHAR_TERM, FOLD, Analyzer, analyze
from matching.errors import BadRowError, BundleError, ConfigError
from matching.layout import LEXICAL_ARRAYS
from matching.lexical.base import BM25Params, LexicalIndex, TermStats
from matching.lexical.bm25_format import FORMAT, FORMAT_VERSION, DamagedError, checked

_TF_MAX = np.iinfo(np.uint16).max
# past MaxScore's floor, a list is searched row by row when it holds this many times more postings than the rows
# that can still reach the top k, else read whole
_SEARCH_PER_ROW = 4
_BOUND_SLACK = 1e-5  # float32 rounding of the scores a bound is compared with


def _slack(terms: int) -> float:
    """A relative margin over the float32 rounding of a sum of ``terms`` parts, whatever their order: two orders
    differ by less than 2 * (terms - 1) units of 2**-24 each (so 1e-5 alone would cover 84 terms)."""
    return max(_BOUND_SLACK, 4 * terms * 2.0**-24)


@dataclass(frozen=True)
class _Stats:
    live: int
    length: int  # terms over the live rows
    avgdl: float
    df: np.ndarray  # int64 (terms,), live rows only
    weight: np.ndarray  # float32 (terms,): idf * (k1 + 1)
    ratio: np.ndarray  # float32 (postings,): tf / (tf + k1 * (1 - b + b * dl / avgdl))
    bound: np.ndarray  # float64 (terms,): weight * the term's largest ratio, the most it adds to any score
    distinct: np.ndarray  # int64 (rows,): each row's distinct terms, character terms aside (analysis.counted)


class BM25Index(LexicalIndex):
    """BM25 over the titles of one generation; row ids are the store's row ids (0..rows-1, never reused;
    removed rows are dead).

    Postings are kept term by term (CSC): ``ptr`` (terms + 1) into ``post_rows`` (ascending per term) and
    ``post_tf``. Term frequencies saturate at 65,535. Mutating while another thread searches is not supported.
    """

    def __init__(
        self,
        analyzer: Analyzer,
        params: BM25Params,
        vocab: list[str],
        ptr: np.ndarray,
        post_rows: np.ndarray,
        post_tf: np.ndarray,
        doc_len: np.ndarray,
        live: np.ndarray,
        fold: int = FOLD,
    ) -> None:
        super().__init__(analyzer, params, fold)
        self._vocab = vocab
        self._ids = {term: i for i, term in enumerate(vocab)}
        self._ptr = ptr
        self._rows = post_rows
        self._tf = post_tf
        self._doc_len = doc_len
        self._live = live
        self._stats: _Stats | None = None
        self._lock = threading.Lock()
        self._scratch = threading.local()

    # -- building and changing -------------------------------------------------------------------------------

    files: ClassVar[tuple[str, ...]] = (LEXICAL_ARRAYS,)
    # False: every posting list of a query is added up in full (the reference pruned searches are tested and
    # benchmarked against; same rows and scores)
    pruning: bool = True

    @classmethod
    def create_empty(cls, analyzer: Analyzer, params: BM25Params, fold: int = FOLD) -> Self:
        return cls(
            analyzer,
            params,
            [],
            np.zeros(1, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.uint16),
            np.zeros(0, np.int32),
            np.zeros(0, np.bool_),
            fold,
        )

    def add(self, row_ids: np.ndarray, titles: Sequence[str]) -> None:
        """Append titles under ``row_ids``: ascending and past every existing row (rows skipped are dead)."""
        row_ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        if len(row_ids) != len(titles):
            raise ValueError(f"{len(row_ids)} row ids for {len(titles)} titles")
        if not len(row_ids):
            return
        if row_ids[0] < self.rows or np.any(np.diff(row_ids) <= 0):
            raise ValueError(f"row ids must ascend from at least {self.rows} (appends only), got {row_ids[:5]}...")
        if row_ids[-1] >= np.iinfo(np.int32).max:
            raise ValueError(f"row id {row_ids[-1]} does not fit the index's int32 postings")
        terms, lengths = self._analyze_many(row_ids, titles)
        self.grow(int(row_ids[-1]) + 1)
        self._doc_len[row_ids] = lengths
        self._live[row_ids] = True
        new_rows = np.repeat(row_ids, lengths)
        key = terms.astype(np.int64) * (int(row_ids[-1]) + 1) + new_rows
        key.sort()
        first = np.ones(len(key), dtype=np.bool_)
        first[1:] = key[1:] != key[:-1]
        starts = np.flatnonzero(first)
        tf = np.minimum(np.diff(np.append(starts, len(key))), _TF_MAX).astype(np.uint16)
        new_terms, new_rows = np.divmod(key[starts], int(row_ids[-1]) + 1)
        self._merge(new_terms, new_rows.astype(np.int32), tf)

    def _analyze_many(self, row_ids: np.ndarray, titles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Term ids (flat, new terms added to the vocabulary) and the number of terms of each title."""
        flat: list[str] = []
        lengths: list[int] = []
        analyzer = self.analyzer
        i = 0
        try:
            for i, title in enumerate(titles):  # noqa: B007 - i names the bad row below
                terms = analyze(title, analyzer, self.fold)
                flat += terms
                lengths.append(len(terms))
        except (AttributeError, TypeError):
            raise BadRowError(f"row {row_ids[i]}: title {titles[i]!r} is not a string") from None
        ids, vocab = self._ids, self._vocab
        get = ids.setdefault
        codes = np.fromiter((get(term, len(ids)) for term in flat), dtype=np.int32, count=len(flat))
        if len(ids) > len(vocab):
            vocab.extend(islice(ids, len(vocab), None))  # dicts keep insertion order
        return codes, np.asarray(lengths, dtype=np.int64)

    def grow(self, rows: int) -> None:
        if rows > self.rows:
            self._doc_len = np.concatenate([self._doc_len, np.zeros(rows - self.rows, np.int32)])
            self._live = np.concatenate([self._live, np.zeros(rows - self.rows, np.bool_)])
            self._changed()

    def _merge(self, terms: np.ndarray, rows: np.ndarray, tf: np.ndarray) -> None:
        """Merge postings sorted by (term, row) whose rows all follow the existing rows: each term's new
        postings go after its old ones, so no sort of the old postings is needed."""
        n_terms = len(self._vocab)
        old = np.zeros(n_terms, dtype=np.int64)
        old[: len(self._ptr) - 1] = np.diff(self._ptr)
        new = np.bincount(terms, minlength=n_terms)
        ptr = np.zeros(n_terms + 1, dtype=np.int64)
        np.cumsum(old + new, out=ptr[1:])
        new_start = np.zeros(n_terms + 1, dtype=np.int64)
        np.cumsum(new, out=new_start[1:])
        dest = np.arange(len(terms), dtype=np.int64) + (ptr[:-1] + old - new_start[:-1])[terms]
        is_new = np.zeros(int(ptr[-1]), dtype=np.bool_)
        is_new[dest] = True
        post_rows = np.empty(len(is_new), dtype=np.int32)
        post_tf = np.empty(len(is_new), dtype=np.uint16)
        post_rows[is_new], post_rows[~is_new] = rows, self._rows
        post_tf[is_new], post_tf[~is_new] = tf, self._tf
        self._ptr, self._rows, self._tf = ptr, post_rows, post_tf
        self._changed()

    def remove(self, row_ids: np.ndarray) -> None:
        """Mark rows dead: they never score again and leave the statistics (N, df, avgdl)."""
        row_ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        if len(row_ids) and (row_ids.min() < 0 or row_ids.max() >= self.rows):
            raise ValueError(f"row ids must be in 0..{self.rows - 1}, got {row_ids.min()}..{row_ids.max()}")
        self._live[row_ids] = False
        self._changed()

    def _changed(self) -> None:
        self._stats = None
        self._scratch = threading.local()

    def compacted(self) -> BM25Index:
        renumber = np.cumsum(self._live, dtype=np.int64) - 1
        vocab, ptr, rows, tf = self._pruned()
        return BM25Index(
            self.analyzer,
            self.params,
            vocab,
            ptr,
            renumber[rows].astype(np.int32),
            tf,
            self._doc_len[self._live],
            np.ones(self.count, dtype=np.bool_),
            self.fold,
        )

    def _pruned(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """Vocabulary and postings without dead rows and without terms left with no rows."""
        if self.count == self.rows and np.all(np.diff(self._ptr) > 0):
            return self._vocab, self._ptr, self._rows, self._tf
        keep = self._live[self._rows]
        df = self._statistics().df
        used = np.flatnonzero(df)
        ptr = np.zeros(len(used) + 1, dtype=np.int64)
        np.cumsum(df[used], out=ptr[1:])
        return [self._vocab[t] for t in used], ptr, self._rows[keep], self._tf[keep]

    # -- statistics ------------------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Row ids in use, live or dead."""
        return len(self._live)

    @property
    def count(self) -> int:
        """Live rows."""
        return int(np.count_nonzero(self._live))

    @property
    def vocabulary_size(self) -> int:
        """Distinct terms, including ones that only dead rows hold."""
        return len(self._vocab)

    def _statistics(self) -> _Stats:
        stats = self._stats
        if stats is not None:
            return stats
        with self._lock:
            if self._stats is None:
                self._stats = self._compute_stats()
            return self._stats

    def _compute_stats(self) -> _Stats:
        live = int(np.count_nonzero(self._live))
        if live == self.rows:
            df = np.diff(self._ptr)
        else:
            alive = np.zeros(len(self._rows) + 1, dtype=np.int64)
            np.cumsum(self._live[self._rows], out=alive[1:])
            df = alive[self._ptr[1:]] - alive[self._ptr[:-1]]
        total = int(self._doc_len[self._live].sum(dtype=np.int64))
        avgdl = total / live if live and total else 1.0
        ratio = _ratio(self._tf, self._norm(self._doc_len, avgdl)[self._rows])
        weight = self._weights(df, live)
        counts = np.diff(self._ptr)
        largest = np.zeros(len(counts), dtype=np.float64)
        if len(ratio):
            largest[counts > 0] = np.maximum.reduceat(ratio, self._ptr[:-1][counts > 0])
        return _Stats(live, total, avgdl, df, weight, ratio, weight * largest, self._distinct(counts))

    def _distinct(self, counts: np.ndarray) -> np.ndarray:
        """Each row's distinct terms as :func:`counted` counts them (``counts``: each term's postings)."""
        rows = self._rows
        if self.analyzer == Analyzer.CHINESE_MIXED:
            words = np.fromiter((not t.startswith(CHAR_TERM) for t in self._vocab), bool, count=len(self._vocab))
            rows = rows[np.repeat(words, counts)]
        return np.bincount(rows, minlength=self.rows).astype(np.int64)

    def _norm(self, doc_len: np.ndarray, avgdl: float) -> np.ndarray:
        """k1 * (1 - b + b * dl / avgdl), float32."""
        k1, b = self.params.k1, self.params.b
        return (k1 * (1 - b + b * doc_len.astype(np.float64) / avgdl)).astype(np.float32)

    def _weights(self, df: np.ndarray, live: int) -> np.ndarray:
        """idf * (k1 + 1) per term, float32."""
        idf = np.log1p((live - df + 0.5) / (df + 0.5))
        return (idf * (self.params.k1 + 1)).astype(np.float32)

    # -- scoring ---------------------------------------------------------------------------------------------

    def query_terms(self, query: str) -> np.ndarray:
        """Term ids (ascending, unique, int64) of the query's terms known to the index."""
        ids = self._ids
        known = {ids[term] for term in analyze(query, self.analyzer, self.fold) if term in ids}
        return np.array(sorted(known), dtype=np.int64)

    def search(
        self, queries: Sequence[str], k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows per query by BM25: scores float32 (nq, k) and row ids int64 (nq, k), best first, ties
        by row id, padded with -inf / -1. Only live rows sharing a term with the query (and ``allowed``, a bool
        mask over rows, when given) are returned."""
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings, not one string")
        if k < 0:
            raise ConfigError(f"k must be >= 0, got {k}")
        if allowed is not None:
            allowed = np.asarray(allowed)
            if allowed.dtype != np.bool_ or allowed.shape != (self.rows,):
                raise ValueError(
                    f"allowed must be a bool mask of shape ({self.rows},), got {allowed.dtype} {allowed.shape}"
                )
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if not k:
            return scores, ids
        stats = self._statistics()
        for i, query in enumerate(queries):
            rows, values = self._candidates(self.query_terms(query), k, stats, allowed)
            if len(rows) > k:
                threshold = values[np.argpartition(-values, k - 1)[k - 1]]
                top = np.flatnonzero(values >= threshold)  # every tie at the threshold, settled by row id below
                rows, values = rows[top], values[top]
            order = np.lexsort((rows, -values))[:k]
            scores[i, : len(order)] = values[order]
            ids[i, : len(order)] = rows[order]
        return scores, ids

    def _candidates(
        self, terms: np.ndarray, k: int, stats: _Stats, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Live, allowed rows sharing a term, with their BM25 (summed as :meth:`score_rows` sums): a set that
        holds the top ``k`` (every such row when there are no more than ``k``)."""
        terms = terms[stats.df[terms] > 0]
        if not len(terms):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if len(terms) == 1:
            start, end = self._ptr[terms[0]], self._ptr[terms[0] + 1]
            return self._kept(self._rows[start:end], stats.weight[terms[0]] * stats.ratio[start:end], stats, allowed)
        rows, approx, floor = self._maxscore(terms, k, stats, allowed)
        rows, approx = self._kept(rows, approx, stats, allowed)
        slack = _slack(len(terms))
        if len(rows) > k:  # the summing order moves a score by a few ulps: keep all that could be in the top k
            if floor > 0:  # the k-th best is at least the floor: look for it among the rows above it only
                above = approx >= floor * (1 - slack)
                rows, approx = rows[above], approx[above]
            kth = np.partition(approx, len(approx) - k)[len(approx) - k]
            rows = rows[approx >= kth * (1 - slack)]
        rows = np.sort(rows)
        return rows, self._score(rows, terms, stats)

    def _maxscore(
        self, terms: np.ndarray, k: int, stats: _Stats, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Every row that can reach the top ``k``, each with its BM25 summed in another order than
        :meth:`_score`'s (so within rounding of it), and maybe others (dead, not allowed, or below the k-th, these
        maybe with only part of their sum);
        and a floor under the k-th best score (0.0 if none was found).

        MaxScore, term at a time, in a per-thread buffer over all rows: lists are read in order of the most
        their term can add to a score. Once the terms left together add less than the k-th best (live,
        allowed) score of the rows of the list just read, a row none of the lists read holds cannot enter the
        top k, and the lists left only add to rows already met. A posting list holds a row at most once and
        every term adds more than 0, so a 0 in the buffer means a row not met yet. 1M generated titles, 300
        queries, top 100 (scripts/bench_hybrid.py): the lists read in full hold 22% of the postings, and search
        takes 2.56 ms against 2.79 ms with :attr:`pruning` off (the lists left are still read, for the rows met);
        in a loop of BM25 searches alone, 2.08 ms against 2.86 ms before this loop (each list added up in full,
        then read back and cleared list by list). Past the floor, the rows met are sifted once a list left is longer
        than them (a row whose sum so far and all the lists left stay under the floor cannot enter the top k), and
        the lists left go to the rows kept (:meth:`_add_to`): 1M Chinese titles whose characters are terms
        (scripts/bench_lexical_chinese.py), top 100 in 5.06 ms against 10.63 ms before; the bundle above 2.26
        against 2.25 ms.
        """
        bounds = stats.bound[terms]
        slack = _slack(len(terms))
        order = np.argsort(-bounds, kind="stable")
        left = np.cumsum(bounds[order][::-1])[::-1] - bounds[order]  # what the terms after each can add
        acc = self._buffer()
        met: list[np.ndarray] = []
        read = 0.0  # what the lists read in full can add
        floor = 0.0
        live: np.ndarray | None = None  # past the floor: the rows met that can still reach it
        try:
            for t, rest in zip(terms[order], left, strict=True):
                if floor:
                    if live is None and self._ptr[t + 1] - self._ptr[t] > sum(map(len, met)):
                        live = np.concatenate(met)  # sifted only for a list longer than the rows met
                    if live is not None:
                        live = live[(acc[live] + (float(stats.bound[t]) + rest)) * (1 + slack) >= floor]
                    self._add_to(acc, live, t, stats)
                    continue
                start, end = self._ptr[t], self._ptr[t + 1]
                part = self._rows[start:end]
                add = stats.weight[t] * stats.ratio[start:end]
                old = acc[part]
                met.append(part[old == 0])
                new = old + add
                acc[part] = new
                read += float(stats.bound[t])
                if self.pruning and rest and rest * (1 + slack) < read:  # else no sum so far can beat what is left
                    # the k-th best of any k rows is a floor under the k-th best of all; this list's rows, with
                    # their sums at hand, are the ones most likely to hold high sums (the term that can add most)
                    _, new = self._kept(part, new, stats, allowed)
                    if len(new) >= k:
                        kth = float(np.partition(new, len(new) - k)[len(new) - k])
                        floor = kth if rest * (1 + slack) < kth else 0.0
            rows = np.concatenate(met)
            values = acc[rows]
            acc[rows] = 0
        except BaseException:
            acc[:] = 0
            raise
        return rows, values, floor

    def _add_to(self, acc: np.ndarray, rows: np.ndarray | None, t: int, stats: _Stats) -> None:
        """Add term ``t``'s BM25 to ``acc`` at those of ``rows`` (distinct, each met before: > 0 in ``acc``) its
        list holds: by a binary search per row when they are few against the list, else (or with no ``rows``) at
        every row met that the list holds, reading the whole list.
        Chinese titles, each character a term (``chinese-mixed``): the lists a query's characters hold are long,
        and the rows that can still reach the top k few."""
        start, end = self._ptr[t], self._ptr[t + 1]
        part = self._rows[start:end]
        if rows is not None and len(rows) * _SEARCH_PER_ROW < len(part):
            at = np.minimum(np.searchsorted(part, rows), len(part) - 1)
            hit = part[at] == rows
            rows, at = rows[hit], at[hit]
            acc[rows] = acc[rows] + stats.weight[t] * stats.ratio[start + at]
        else:
            old = acc[part]
            hit = old > 0
            acc[part[hit]] = old[hit] + (stats.weight[t] * stats.ratio[start:end])[hit]

    def _kept(
        self, rows: np.ndarray, values: np.ndarray | None, stats: _Stats, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The live, allowed ones of ``rows`` (and their ``values``)."""
        keep = self._live[rows] if stats.live < self.rows else None
        if allowed is not None:
            keep = allowed[rows] if keep is None else keep & allowed[rows]
        if keep is not None:
            rows = rows[keep]
            values = None if values is None else values[keep]
        return rows.astype(np.int64), np.zeros(0, np.float32) if values is None else values

    def _score(self, rows: np.ndarray, terms: np.ndarray, stats: _Stats) -> np.ndarray:
        """BM25 of stored rows (int, live), summed in term id order as :meth:`score_texts` sums, so search,
        :meth:`score_rows` and :meth:`score_texts` give the same float32 for a row. Ascending rows make the
        binary searches cheaper."""
        rows = rows.astype(np.int32)
        acc = np.zeros(len(rows), dtype=np.float32)
        for t in terms:
            start, end = self._ptr[t], self._ptr[t + 1]
            if not stats.df[t]:
                continue
            postings = self._rows[start:end]
            at = np.minimum(np.searchsorted(postings, rows), len(postings) - 1)
            hit = postings[at] == rows
            acc[hit] += stats.weight[t] * stats.ratio[start + at[hit]]
        return acc

    def _buffer(self) -> np.ndarray:
        """This thread's float32 zeros over all rows (zero again after each use)."""
        acc: np.ndarray | None = getattr(self._scratch, "acc", None)
        if acc is None:
            acc = self._scratch.acc = np.zeros(self.rows, dtype=np.float32)
        return acc

    def score_rows(self, query: str, row_ids: np.ndarray) -> np.ndarray:
        """BM25 of ``query`` against stored rows, float32; 0 for dead rows, ids outside 0..rows-1 (such as -1
        padding) and rows sharing no term."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        out = np.zeros(row_ids.shape, dtype=np.float32)
        flat = row_ids.reshape(-1)
        valid = (flat >= 0) & (flat < self.rows)
        valid[valid] = self._live[flat[valid]]
        out.reshape(-1)[valid] = self._score(flat[valid], self.query_terms(query), self._statistics())
        return out

    def statistics(self, terms: Iterable[str]) -> TermStats:
        stats, ids = self._statistics(), self._ids
        df = {term: int(stats.df[ids[term]]) if term in ids else 0 for term in set(terms)}
        return TermStats(stats.live, stats.length, df)

    def score_texts(self, query: str, titles: Sequence[str], stats: TermStats | None = None) -> np.ndarray:
        """BM25 of ``query`` against any titles, float32, with ``stats`` or this index's N, df and avgdl (a term
        they do not know has df 0). A stored row's title scores as in :meth:`search`."""
        terms = self._ordered_terms(query)
        column = {term: j for j, term in enumerate(terms)}
        tf = np.zeros((len(titles), len(terms)), dtype=np.float32)
        dl = np.zeros(len(titles), dtype=np.float64)
        for i, title in enumerate(titles):
            words = analyze(title, self.analyzer, self.fold)
            dl[i] = len(words)
            for word in words:
                j = column.get(word)
                if j is not None:
                    tf[i, j] += 1
        weights, avgdl = self._term_weights(terms, stats)
        norm = self._norm(dl, avgdl)
        acc = np.zeros(len(titles), dtype=np.float32)
        for j in range(len(terms)):
            hit = tf[:, j] > 0
            acc[hit] += weights[j] * _ratio(np.minimum(tf[hit, j], _TF_MAX), norm[hit])
        return acc

    def distinct_terms(self, row_ids: np.ndarray) -> np.ndarray:
        """Each stored row's number of distinct terms (0 for ids outside 0..rows-1), as ``distinct_count`` counts
        its title."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        valid = (row_ids >= 0) & (row_ids < self.rows)
        out = np.zeros(row_ids.shape, dtype=np.int64)
        out[valid] = self._statistics().distinct[row_ids[valid]]
        return out

    def max_score(self, query: str, stats: TermStats | None = None) -> float:
        """An upper bound of the query's BM25 over any title, for normalising into [0, 1]: the sum over its
        distinct terms of idf(t) * (k1 + 1), summed in float32 in scoring order so it bounds the float32
        scores too."""
        weights, _ = self._term_weights(self._ordered_terms(query), stats)
        total = np.float32(0)
        for weight in weights:
            total = np.float32(total + weight)
        return float(total)

    def _ordered_terms(self, query: str) -> list[str]:
        """The query's distinct terms in the order scores are summed: known terms by id, then unknown ones."""
        ids = self._ids
        distinct = set(analyze(query, self.analyzer, self.fold))
        known = sorted((ids[term], term) for term in distinct if term in ids)
        return [term for _, term in known] + sorted(term for term in distinct if term not in ids)

    def _term_weights(self, terms: list[str], given: TermStats | None) -> tuple[np.ndarray, float]:
        """idf * (k1 + 1) of ``terms`` and the mean title length, from ``given`` statistics or this index's own."""
        if given is not None:
            df = np.array([given.df.get(term, 0) for term in terms], dtype=np.int64)
            return self._weights(df, given.live), given.avgdl
        stats = self._statistics()
        df = np.array([stats.df[self._ids[term]] if term in self._ids else 0 for term in terms], dtype=np.int64)
        return self._weights(df, stats.live), stats.avgdl

    # -- files -----------------------------------------------------------------------------------------------

    def write(self, directory: Path) -> dict[str, Any]:
        """Write ``lexical.safetensors`` into ``directory`` (dead rows' postings dropped); the record holds the
        vocabulary."""
        vocab, ptr, rows, tf = self._pruned()
        doc_len = np.where(self._live, self._doc_len, 0).astype(np.int32)
        arrays = {"ptr": ptr, "post_rows": rows, "post_tf": tf, "doc_len": doc_len, "live": self._live}
        save_file({name: np.ascontiguousarray(a) for name, a in arrays.items()}, str(directory / LEXICAL_ARRAYS))
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "analyzer": str(self.analyzer),
            "fold": self.fold,
            "params": {"k1": self.params.k1, "b": self.params.b},
            "rows": self.rows,
            "vocab": vocab,
        }

    @classmethod
    def read(cls, directory: Path, meta: Any) -> Self:
        arrays_path = directory / LEXICAL_ARRAYS
        if not arrays_path.is_file():
            raise BundleError(f"lexical index file {str(arrays_path)!r} is missing; rebuild the bundle's lexical index")
        try:
            arrays = load_file(str(arrays_path))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise BundleError(f"cannot read lexical index arrays {str(arrays_path)!r}: {exc}") from None
        try:
            return cls(*checked(meta, arrays))
        except DamagedError as exc:
            raise BundleError(f"lexical index in {str(directory)!r} is damaged or foreign: {exc}") from None

    def equals(self, other: BM25Index) -> bool:
        """Same analyser, parameters, live rows, title lengths and postings (term ids compared by term)."""
        if (self.analyzer, self.fold, self.params) != (other.analyzer, other.fold, other.params):
            return False
        if not np.array_equal(np.flatnonzero(self._live), np.flatnonzero(other._live)):
            return False
        if not np.array_equal(self._doc_len[self._live], other._doc_len[other._live]):
            return False
        mine, theirs = self._canonical(), other._canonical()
        return all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True))

    def _canonical(self) -> tuple[np.ndarray, ...]:
        vocab, ptr, rows, tf = self._pruned()
        words = np.array(vocab, dtype=object)
        rank = np.empty(len(vocab), dtype=np.int64)
        rank[np.argsort(words)] = np.arange(len(vocab))
        terms = np.repeat(rank, np.diff(ptr))
        order = np.lexsort((rows, terms))
        return np.sort(words).astype(str), terms[order], rows[order], tf[order]


def _ratio(tf: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """tf / (tf + norm) in float32; a term adds idf * (k1 + 1) times this. It rounds to at most 1, so a term
    never adds more than its weight and :meth:`LexicalIndex.max_score` stays a bound after rounding."""
    tf = tf.astype(np.float32)
    out: np.ndarray = tf / (tf + norm)
    return out
