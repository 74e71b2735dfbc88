"""The lexical engine seam: :class:`LexicalIndex`, what every lexical backend implements, and their registry.

Every backend ranks by BM25 (the fusion normalises by it, :func:`matching.features.fuse`); backends differ in how
they store and search postings. A backend is one module with a :class:`LexicalIndex` subclass and one
:func:`register` line. Its record file is ``lexical.json``, which names the backend (``backend``; absent: ``bm25``,
as in every bundle made before the seam). Scoring takes collection statistics (:class:`TermStats`) from outside
where an index is one part of a larger catalogue.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self, cast

import numpy as np

from matching.analysis import FOLD, Analyzer, analyze, counted, resolve_analyzer
from matching.errors import BundleError, ConfigError
from matching.layout import LEXICAL_CONFIG

DEFAULT_BACKEND = "bm25"
_BACKENDS: dict[str, type[LexicalIndex]] = {}


@dataclass(frozen=True)
class BM25Params:
    """BM25's term-frequency saturation ``k1`` and length normalisation ``b``."""

    k1: float = 1.2
    b: float = 0.75

    def __post_init__(self) -> None:
        if not (isinstance(self.k1, int | float) and math.isfinite(self.k1) and self.k1 >= 0):
            raise ConfigError(f"BM25 k1 must be a finite number >= 0 (usually 0.9-2.0), got {self.k1!r}")
        if not (isinstance(self.b, int | float) and 0 <= self.b <= 1):
            raise ConfigError(f"BM25 b must be a number in [0, 1] (usually 0.75), got {self.b!r}")


DEFAULT_PARAMS = BM25Params()


@dataclass(frozen=True)
class TermStats:
    """The collection statistics BM25 reads: live rows, the terms they hold in all, and the live rows holding
    each term (``df``, for the terms asked about). Parts of one catalogue add up (``a + b``)."""

    live: int
    length: int
    df: dict[str, int]

    @property
    def avgdl(self) -> float:
        return self.length / self.live if self.live and self.length else 1.0

    def __add__(self, other: TermStats) -> TermStats:
        df = dict(self.df)
        for term, count in other.df.items():
            df[term] = df.get(term, 0) + count
        return TermStats(self.live + other.live, self.length + other.length, df)


class LexicalIndex(abc.ABC):
    """BM25 over titles under the store's row ids (0..rows-1, never reused; removed rows are dead).

    Called on ``LexicalIndex`` itself, :meth:`build` makes the backend named by ``backend`` and :meth:`load` the
    one ``lexical.json`` names; called on a backend class, they make that backend.
    """

    name: ClassVar[str]
    files: ClassVar[tuple[str, ...]]  # beside lexical.json

    def __init__(self, analyzer: Analyzer, params: BM25Params, fold: int) -> None:
        self.analyzer = analyzer
        self.params = params
        self.fold = fold  # the case folding its terms were made with (matching.analysis.FOLD)

    @classmethod
    def build(
        cls,
        titles: Iterable[tuple[int, str]] | Sequence[str],
        analyzer: Analyzer,
        params: BM25Params = DEFAULT_PARAMS,
        *,
        rows: int | None = None,
        fold: int = FOLD,
        backend: str = DEFAULT_BACKEND,
    ) -> LexicalIndex:
        """Index ``titles``: strings are rows 0..n-1 in order; ``(row_id, title)`` pairs need ascending row ids
        and rows left out are dead. ``rows`` (default: one past the last row) adds dead rows at the end.
        ``Analyzer.AUTO`` is resolved from the titles; ``fold`` is the case folding (the current one unless a
        test recreates an older index)."""
        items = list(titles)
        if items and not isinstance(items[0], str):
            pairs = cast(list[tuple[int, str]], items)
            row_ids = np.fromiter((row for row, _ in pairs), dtype=np.int64, count=len(pairs))
            texts = [title for _, title in pairs]
        else:
            row_ids = np.arange(len(items), dtype=np.int64)
            texts = cast(list[str], items)
        analyzer = _analyzer(analyzer)
        if analyzer == Analyzer.AUTO:
            analyzer = resolve_analyzer(texts)
        target = lexical_backend(backend) if cls is LexicalIndex else cls
        index = target.create_empty(analyzer, params, fold)
        index.add(row_ids, texts)
        if rows is not None:
            if rows < index.rows:
                raise ValueError(f"rows={rows} is below the last row id {index.rows - 1}")
            index.grow(rows)
        return index

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        """Read an index written by :meth:`save`; a missing, damaged or foreign one raises BundleError."""
        path = directory / LEXICAL_CONFIG
        if not path.is_file():
            raise BundleError(f"lexical index file {str(path)!r} is missing; rebuild the bundle's lexical index")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"cannot read lexical index {str(path)!r}: {exc}") from None
        name = meta.get("backend", DEFAULT_BACKEND) if isinstance(meta, dict) else DEFAULT_BACKEND
        if name not in _BACKENDS:
            raise BundleError(
                f"{str(path)!r} names the lexical backend {name!r}, which is not registered "
                f"(known: {sorted(_BACKENDS)}); import the module that registers it, or rebuild the bundle"
            )
        return _BACKENDS[name].read(directory, meta)

    def save(self, directory: Path) -> None:
        """The backend's files and ``lexical.json`` (its record, the backend named) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        meta = {**self.write(directory), "backend": self.name}
        (directory / LEXICAL_CONFIG).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")

    def record(self) -> dict[str, Any]:
        """The manifest's lexical entry for this index (the fusion and retrieval entries are added by the caller)."""
        return {
            "backend": self.name,
            "analyzer": self.analyzer.value,
            "fold": self.fold,
            "k1": self.params.k1,
            "b": self.params.b,
        }

    def terms(self, text: str) -> list[str]:
        """The terms of ``text`` as this index analyses it."""
        return analyze(text, self.analyzer, self.fold)

    def distinct_count(self, text: str) -> int:
        """The number of distinct terms the analyser finds in ``text``, character terms aside
        (:func:`matching.analysis.counted`)."""
        return len(counted(self.terms(text)))

    # -- what a backend implements ---------------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def create_empty(cls, analyzer: Analyzer, params: BM25Params, fold: int) -> Self:
        """An index with no rows (``analyzer`` resolved)."""

    @classmethod
    @abc.abstractmethod
    def read(cls, directory: Path, meta: Any) -> Self:
        """The index whose ``lexical.json`` holds ``meta`` (as :meth:`write` returned it) and whose files lie in
        ``directory``; a missing or damaged one is a ``BundleError``."""

    @abc.abstractmethod
    def write(self, directory: Path) -> dict[str, Any]:
        """Write the backend's own files (``files``); return the record for ``lexical.json``."""

    @abc.abstractmethod
    def add(self, row_ids: np.ndarray, titles: Sequence[str]) -> None:
        """Append titles under ``row_ids``: ascending and past every existing row (rows skipped are dead)."""

    @abc.abstractmethod
    def grow(self, rows: int) -> None:
        """Make row ids up to ``rows`` exist (dead)."""

    @abc.abstractmethod
    def remove(self, row_ids: np.ndarray) -> None:
        """Mark rows dead: they never score again and leave the statistics."""

    @abc.abstractmethod
    def compacted(self) -> LexicalIndex:
        """A new index of the live rows only, renumbered 0..count-1 in row order (as the store compacts)."""

    @property
    @abc.abstractmethod
    def rows(self) -> int:
        """Row ids in use, live or dead."""

    @property
    @abc.abstractmethod
    def count(self) -> int:
        """Live rows."""

    @abc.abstractmethod
    def statistics(self, terms: Iterable[str]) -> TermStats:
        """This index's live rows, their total length, and the document frequency of each of ``terms``."""

    @abc.abstractmethod
    def search(
        self, queries: Sequence[str], k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows per query by BM25: scores float32 (nq, k) and row ids int64 (nq, k), best first, ties
        by row id, padded with -inf / -1. Only live rows sharing a term with the query (and ``allowed``, a bool
        mask over rows, when given) are returned."""

    @abc.abstractmethod
    def score_rows(self, query: str, row_ids: np.ndarray) -> np.ndarray:
        """BM25 of ``query`` against stored rows, float32; 0 for dead rows, ids outside 0..rows-1 (such as -1
        padding) and rows sharing no term."""

    @abc.abstractmethod
    def score_texts(self, query: str, titles: Sequence[str], stats: TermStats | None = None) -> np.ndarray:
        """BM25 of ``query`` against any titles, float32, with ``stats`` (default: this index's own; a term they do
        not know has df 0). A stored row's title scores as in :meth:`search`."""

    @abc.abstractmethod
    def max_score(self, query: str, stats: TermStats | None = None) -> float:
        """An upper bound of the query's BM25 over any title: the sum over its distinct terms of idf * (k1 + 1)."""

    @abc.abstractmethod
    def distinct_terms(self, row_ids: np.ndarray) -> np.ndarray:
        """Each stored row's number of distinct terms as :meth:`distinct_count` counts its title, character terms
        aside (:func:`matching.analysis.counted`); 0 for ids outside 0..rows-1."""


def register(name: str, cls: type[LexicalIndex]) -> None:
    """Make ``cls`` the lexical backend called ``name`` (what ``lexical.json`` and the manifest name)."""
    cls.name = name
    _BACKENDS[name] = cls


def lexical_backend(name: str) -> type[LexicalIndex]:
    """The lexical backend registered as ``name``."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown lexical backend {name!r}; choose one of {sorted(_BACKENDS)}") from None


def lexical_backends() -> list[str]:
    """The names of the registered lexical backends."""
    return sorted(_BACKENDS)


def lexical_files() -> frozenset[str]:
    """Every file a registered lexical backend writes (a catalogue change rewrites them, never carries them)."""
    return frozenset(name for cls in _BACKENDS.values() for name in cls.files)


def _analyzer(value: Analyzer | str) -> Analyzer:
    try:
        return Analyzer(value)
    except ValueError:
        raise ConfigError(f"unknown analyzer {value!r}; use one of {', '.join(a.value for a in Analyzer)}") from None
