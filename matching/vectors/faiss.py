"""The FAISS vector backend: inner product over unit vectors, explicit int64 ids shared with the store.

IVF indexes keep the ids themselves (so titles can be removed); every other kind is wrapped in an
``IndexIDMap``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

import faiss
import numpy as np

from matching.config import IndexConfig
from matching.errors import BundleError, ConfigError
from matching.exact import drop_pages
from matching.layout import INDEX_FILE
from matching.vectors.assign import add_assigned
from matching.vectors.autoindex import (
    IndexChoice,
    auto_tune,
    choice_for_factory,
    choose_index,
    core_index,
    retrieve,
    set_search_param,
)
from matching.vectors.base import VectorIndex
from matching.vectors.kmeans import TWO_LEVEL_MIN_LISTS, two_level_centroids

_ADD_BATCH = 65_536
_MAX_FILTERED_EF = 2048  # a widened filtered HNSW search scans at most this many candidates
_TRAIN_SAMPLE = 100_000
# k-means iterations of an IVF coarse quantizer (FAISS: 25). IVF4096,SQ8 on the 1M product titles' 262k training
# points: 25 iterations 128.9 s, 15 78.4 s, 10 54.0 s; recall@10 after the exact refine at the tuned nprobe 7 0.9612,
# 0.9604, 0.9606. On a harder synthetic set (scripts/tune_index.py's clusters of ~4 titles, 200k, IVF2048) 15
# iterations are within 0.4 points of 25 at nprobe 4-128 (either way), while 10 lose 0.5-1 point. From
# TWO_LEVEL_MIN_LISTS lists up both levels of the two-level k-means take as many (matching/vectors/kmeans.py).
IVF_TRAIN_ITERATIONS = 15
AUTO = "auto"
_SMALL_BATCH = 16


def filter_widening(share: float) -> int:
    """How many times the tuned nprobe / efSearch a filtered search scans, for a filter passing ``share`` of the
    ids: 2 x ceil(sqrt(1 / share)). A filter drops most of the codes a search scans, and with them the recall.
    Measured on 1M product titles (IVF4096,SQ8 tuned to nprobe 7; recall@10 of the filtered search against exact
    search over the passing rows, one query at a time): share 50% 0.963 -> 0.990 (x4, 0.88 ms), 10% 0.948 -> 0.995
    (x8, 0.86 ms), 3% 0.912 -> 0.997 (x12), 1% 0.890 -> 1.000 (x20, 0.74 ms); unwidened 0.3-0.5 ms."""
    if share <= 0:
        return 1
    return 2 * math.ceil(math.sqrt(1 / min(1.0, share)))


class FaissIndex(VectorIndex):
    """A FAISS index plus the config it was made with (``factory`` a ``faiss.index_factory`` string or ``auto``)."""

    files: ClassVar[tuple[str, ...]] = (INDEX_FILE,)

    def __init__(self, index: Any, config: IndexConfig, tuning: dict[str, Any] | None = None) -> None:
        super().__init__(config, tuning)
        self.index = index
        self._apply_search_params()

    @classmethod
    def create(cls, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig, *, tune: bool = True) -> Self:
        """Index ``vectors`` (n, d) under ``ids`` (n,), training the index first when it needs it.

        ``"auto"`` is resolved for n (see :class:`IndexConfig`); with ``tune`` and ``ids`` equal to the row
        numbers of ``vectors``, nprobe / efSearch are tuned to the config's ``target_recall``.
        """
        n, dim = vectors.shape
        choice = resolve(config, n, dim)
        config = dataclasses.replace(
            config,
            factory=choice.factory,
            refine_factor=config.refine_factor or (choice.refine_factor if choice.refine else None),
        )
        base = _new_base(dim, config)
        ivf = faiss.try_extract_index_ivf(base)
        if ivf is not None:
            ivf.cp.niter = IVF_TRAIN_ITERATIONS
        try:
            if not base.is_trained:
                rng = np.random.default_rng(0)
                size = min(n, max(choice.train_size, _TRAIN_SAMPLE))
                take = np.sort(rng.choice(n, size=size, replace=False))
                sample = np.empty((len(take), dim), dtype=np.float32)
                for start in range(0, len(take), _ADD_BATCH // 4):  # in pieces: little of the file resident
                    part = take[start : start + _ADD_BATCH // 4]
                    sample[start : start + len(part)] = vectors[part]
                    drop_pages(vectors)
                if (ivf := _two_level_ivf(base, len(sample))) is not None:
                    ivf.quantizer.add(two_level_centroids(sample, int(ivf.nlist), IVF_TRAIN_ITERATIONS))
                base.train(sample)  # a filled quantizer is kept as it is: only the codes train
                del sample
            index = _with_ids(base)
            for start in range(0, n, _ADD_BATCH):
                add_assigned(index, vectors[start : start + _ADD_BATCH], ids[start : start + _ADD_BATCH])
                drop_pages(vectors)
        except RuntimeError as exc:
            raise ConfigError(
                f"FAISS could not build {config.factory!r} over {n} vectors ({exc}); "
                "an IVF index needs more titles than cells, so choose a smaller one or 'Flat'"
            ) from None
        built = cls(index, config)
        param = {"nprobe": "nprobe", "efSearch": "ef_search"}.get(choice.search_param or "")
        sequential = len(ids) == 0 or (ids[0] == 0 and ids[-1] == n - 1 and bool(np.all(np.diff(ids) == 1)))
        if tune and param and config.target_recall and getattr(config, param) is None and sequential and n > 1:
            tuning = auto_tune(
                built.index,
                vectors,
                dataclasses.replace(choice, refine=bool(config.refine_factor), refine_factor=config.refine_factor or 1),
                target_recall=config.target_recall,
            )
            value = int(tuning["value"])
            if param == "nprobe":
                built.config = dataclasses.replace(config, nprobe=value)
            else:
                built.config = dataclasses.replace(config, ef_search=value)
            built.tuning = {k: v for k, v in tuning.items() if k != "evaluated"}
            built._apply_search_params()
            drop_pages(vectors)
        return built

    @classmethod
    def create_empty(cls, dim: int, config: IndexConfig) -> Self:
        """An empty index for ``config``: checks the factory string and search parameters cheaply."""
        if config.factory == AUTO:
            config = dataclasses.replace(config, factory="Flat")
        return cls(_with_ids(_new_base(dim, config)), config)

    def _apply_search_params(self) -> None:
        for name, value in (("nprobe", self.config.nprobe), ("efSearch", self.config.ef_search)):
            if value is None:
                continue
            try:
                set_search_param(self.index, name, value)
            except RuntimeError:
                raise ConfigError(
                    f"search parameter {name}={value} does not apply to index {self.config.factory!r}; "
                    "leave it unset for this index type"
                ) from None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed: np.ndarray | None = None,
        stored: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` (scores, ids) per query row; missing slots have id -1.

        ``allowed`` (a boolean mask over ids) restricts the search inside FAISS; it raises
        ``NotImplementedError`` where this index type cannot take a selector, and the caller searches the
        subset itself. With ``stored`` (the full-precision vectors, row = id) and a lossy index,
        ``refine_factor`` x ``k`` candidates are re-scored exactly and the scores are exact.
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(int(k), self.ntotal)) if self.ntotal else 1
        refine = self.config.refine_factor if stored is not None else None
        params = None
        if allowed is not None:
            bitmap = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
            share = np.count_nonzero(allowed) / max(1, self.ntotal)
            params = self._params(selector, filter_widening(share))
            if params is None:
                raise NotImplementedError(f"index {self.config.factory!r} cannot search with a filter")
        with _threads_for(len(q)):
            if refine:
                return retrieve(self.index, q, k, stored_vectors=stored, candidates=k * refine, params=params)
            return retrieve(self.index, q, k, params=params)

    def _params(self, selector: Any, widen: int) -> Any:
        # the per-call parameters replace the index's own, so copy nprobe / efSearch across (widened: a filter
        # leaves fewer of the codes scanned; see filter_widening)
        core = core_index(self.index)
        params: Any
        if isinstance(core, faiss.IndexIVF):
            params = faiss.SearchParametersIVF()
            params.nprobe = min(int(core.nlist), int(core.nprobe) * widen)
        elif isinstance(core, faiss.IndexHNSW):
            params = getattr(faiss, "SearchParametersHNSW")()  # noqa: B009  (missing from faiss's stubs)
            tuned = int(core.hnsw.efSearch)
            params.efSearch = max(tuned, min(_MAX_FILTERED_EF, tuned * widen))
        elif isinstance(core, faiss.IndexFlat):
            params = faiss.SearchParameters()
        else:
            return None
        params.sel = selector
        return params

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``vectors`` under ``ids`` (the index must already be trained)."""
        for start in range(0, len(ids), _ADD_BATCH):
            add_assigned(self.index, vectors[start : start + _ADD_BATCH], ids[start : start + _ADD_BATCH])

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ``ids``; ``False`` where this index type cannot remove (rebuild it instead)."""
        if not len(ids):
            return True
        try:
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
        except RuntimeError:
            return False
        return True

    def write(self, directory: Path) -> None:
        faiss.write_index(self.index, str(directory / INDEX_FILE))

    @classmethod
    def read(cls, directory: Path, config: IndexConfig) -> Self:
        path = directory / INDEX_FILE
        if not path.is_file():
            raise BundleError(f"bundle index file {str(path)!r} is missing")
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, MemoryError) as exc:  # a crafted size: FAISS's bad_alloc arrives as MemoryError
            raise BundleError(f"cannot read FAISS index {str(path)!r}: {exc!r}") from None
        return cls(index, config)


@contextlib.contextmanager
def _threads_for(queries: int) -> Iterator[None]:
    """One FAISS thread for a few queries. Measured on 2 cores: with two, FAISS's OpenMP threads keep
    spinning after a Flat search of one query and slow the reranker's torch work that follows 4x
    (10k titles: 10.3 ms a search vs 4.0 ms). Many queries at once still use every thread."""
    if queries > _SMALL_BATCH:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _with_ids(base: Any) -> Any:
    # IndexIDMap.remove_ids is only right for indexes that renumber on removal (Flat); IVF keeps ids
    try:
        faiss.extract_index_ivf(base)
    except RuntimeError:
        return faiss.IndexIDMap(base)
    return base


def resolve(config: IndexConfig, n: int, dim: int) -> IndexChoice:
    """The index ``config`` asks for at ``n`` vectors: the automatic choice, or the user's factory."""
    if config.factory == AUTO:
        return choose_index(n, dim, memory_budget_bytes=config.memory_budget)
    return choice_for_factory(config.factory, n)


def _two_level_ivf(base: Any, samples: int) -> Any:
    """``base`` itself when it is an IVF index that two-level k-means trains (else None): TWO_LEVEL_MIN_LISTS lists
    or more, at least as many sample points, no pre-transform or refine wrapper (the automatic choice has none) and
    a flat or HNSW quantizer, one that takes centroids untrained (an SQ or PQ quantizer must train first)."""
    inner = faiss.downcast_index(base)
    if not isinstance(inner, faiss.IndexIVF) or inner.nlist < TWO_LEVEL_MIN_LISTS or samples < inner.nlist:
        return None
    quantizer = faiss.downcast_index(inner.quantizer)
    if not isinstance(quantizer, faiss.IndexFlat | faiss.IndexHNSWFlat) or quantizer.ntotal:
        return None
    return inner


def _new_base(dim: int, config: IndexConfig) -> Any:
    try:
        return faiss.index_factory(dim, config.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(f"FAISS cannot build index factory {config.factory!r}: {exc}") from None
