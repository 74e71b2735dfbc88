"""A lexical index built beside a build's encoding: each chunk of titles is handed over as its rows are written,
and a worker thread analyses and indexes them while the encoder runs.

The analysis is pure Python, but the encoder spends most of its time in kernels that release the interpreter
lock. Measured on 2 cores of a Xeon (MiniLM, ``default``, 40,000 product titles): encoding alone 14.33 s;
analysing 200,000 titles alone 1.14 s; both at once 14.69 s. The 1M build's BM25 stage had followed the
encoding: 5.3 s, 1.6 s of it reading the titles back from the store.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from matching import analysis
from matching.analysis import FOLD, Analyzer, resolve_analyzer
from matching.background import Background
from matching.errors import ConfigError
from matching.lexical.base import DEFAULT_BACKEND, DEFAULT_PARAMS, LexicalIndex, lexical_backend

# titles indexed at once (each batch merges into every posting so far); with ``auto``, the first batch holds the
# titles resolve_analyzer reads (analysis.RESOLVE_SAMPLE), as a build over all of them reads
FLUSH_TITLES = 100_000
_QUEUE_DEPTH = 8  # chunks waiting for the worker (a build's chunk is 20,000 rows by default)
_FLUSH = "flush"  # queued by flush(): index what is waiting now


class LexicalStream:
    """Builds what ``LexicalIndex.build(pairs, analyzer, rows=rows)`` builds over the same ``(row_id, title)``
    pairs, from chunks handed to :meth:`add` in row order; :meth:`finish` returns the index, :meth:`close`
    abandons it. An error in the worker (a title that is not a string) is raised by the next call."""

    def __init__(self, analyzer: Analyzer | str, *, backend: str = DEFAULT_BACKEND) -> None:
        try:
            self.analyzer = Analyzer(analyzer)
        except ValueError:
            known = ", ".join(a.value for a in Analyzer)
            raise ConfigError(f"unknown analyzer {analyzer!r}; use one of {known}") from None
        self._backend = lexical_backend(backend)
        self._index: LexicalIndex | None = None
        self._ids: list[np.ndarray] = []
        self._titles: list[str] = []
        self._abandoned = False
        self._worker: Background[tuple[np.ndarray, list[str]] | str] = Background(
            self._take, depth=_QUEUE_DEPTH, name="matching-lexical", what="lexical stream"
        )

    def add(self, row_ids: np.ndarray, titles: Sequence[str]) -> None:
        """Index ``titles`` under ``row_ids`` (ascending, past every row added before); waits while the worker is
        ``_QUEUE_DEPTH`` chunks behind."""
        self._worker.check()
        self._worker.put((np.array(row_ids, dtype=np.int64).reshape(-1), list(titles)))

    def flush(self) -> None:
        """Index what was added so far now, not at :meth:`finish` (titles wait for a full batch otherwise). For
        after the last :meth:`add`: with ``auto``, the first batch indexed resolves the analyser."""
        self._worker.check()
        self._worker.put(_FLUSH)

    def finish(self, rows: int) -> LexicalIndex:
        """The index over every title added, with row ids up to ``rows`` (the store's rows; those never added are
        dead)."""
        if self._abandoned:
            raise RuntimeError("this lexical stream was closed: its index is incomplete")
        self._worker.join()
        self._worker.check()
        if self._titles:  # what the worker left waiting for a full batch
            self._flush()
        index = self._index or self._create([])
        if rows < index.rows:
            raise ValueError(f"rows={rows} is below the last row id {index.rows - 1}")
        index.grow(rows)
        return index

    def close(self) -> None:
        """Abandon the index (a failed build): the worker drops what is queued and ends."""
        self._abandoned = True
        self._worker.join()

    def _take(self, item: tuple[np.ndarray, list[str]] | str) -> None:
        if self._abandoned:
            return
        if isinstance(item, tuple):
            self._ids.append(item[0])
            self._titles += item[1]
        if self._titles and (item == _FLUSH or len(self._titles) >= self._batch()):
            self._flush()

    def _batch(self) -> int:
        if self._index is None and self.analyzer == Analyzer.AUTO:
            return max(FLUSH_TITLES, analysis.RESOLVE_SAMPLE)
        return FLUSH_TITLES

    def _flush(self) -> None:
        ids, titles = np.concatenate(self._ids), self._titles
        self._ids, self._titles = [], []
        if self._index is None:
            self._index = self._create(titles)
        self._index.add(ids, titles)

    def _create(self, titles: list[str]) -> LexicalIndex:
        analyzer = resolve_analyzer(titles) if self.analyzer == Analyzer.AUTO else self.analyzer
        return self._backend.create_empty(analyzer, DEFAULT_PARAMS, FOLD)
