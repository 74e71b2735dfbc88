"""The vector index seam: :class:`VectorIndex`, what every backend implements, and the registry of backends.

A backend is one module with a :class:`VectorIndex` subclass and one :func:`register` line. A bundle names its
backend in the index record (``backend`` in ``index.json`` and the manifest's ``index`` entry); a record without
one is a FAISS index, as every bundle made before the seam is.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from matching.config import IndexConfig
from matching.errors import BundleError, ConfigError
from matching.layout import INDEX_CONFIG

_BACKENDS: dict[str, type[VectorIndex]] = {}


class VectorIndex(abc.ABC):
    """Inner-product top-k over unit vectors under explicit int64 ids (the store's row numbers).

    Called on ``VectorIndex`` itself, :meth:`build`, :meth:`empty` and :meth:`load` make the backend the config
    (or the saved ``index.json``) names; called on a backend class, they make that backend. A backend implements
    :meth:`create`, :meth:`create_empty`, :meth:`read`, :meth:`write`, :attr:`ntotal`, :meth:`search`,
    :meth:`add` and :meth:`remove`, and lists the files it writes in ``files`` (beside ``index.json``).
    """

    name: ClassVar[str]
    files: ClassVar[tuple[str, ...]]

    def __init__(self, config: IndexConfig, tuning: dict[str, Any] | None = None) -> None:
        self.config = config
        self.tuning = tuning  # what build-time tuning measured (recorded in the manifest)

    # -- making one ---------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig | None = None, *, tune: bool = True
    ) -> VectorIndex:
        """Index ``vectors`` (n, d) under ``ids`` (n,); ``tune``: the backend may tune its search to the config's
        ``target_recall`` (only when ``ids`` are the row numbers of ``vectors``)."""
        target, config = cls._target(config or IndexConfig())
        return target.create(vectors, ids, config, tune=tune)

    @classmethod
    def empty(cls, dim: int, config: IndexConfig) -> VectorIndex:
        """An empty index of ``dim`` for ``config``: checks the config cheaply."""
        target, config = cls._target(config)
        return target.create_empty(dim, config)

    @classmethod
    def removes(cls, dim: int, config: IndexConfig) -> bool:
        """Whether an index of ``config`` can remove rows, asked of an empty one once per config (a change kept as a
        delta needs it: readers replay its removals onto the index); False where no such index can be made here."""
        return _removes(cls, dim, config)

    @classmethod
    def load(cls, directory: Path) -> VectorIndex:
        """The index saved in ``directory``, by the backend its ``index.json`` names (FAISS where none)."""
        path = directory / INDEX_CONFIG
        if not path.is_file():  # name the default backend's files too where they are gone as well
            default = _BACKENDS.get(IndexConfig().backend)
            gone = [INDEX_CONFIG, *(f for f in (default.files if default else ()) if not (directory / f).is_file())]
            raise BundleError(f"bundle index file(s) {gone} missing from {str(directory)!r}; rebuild the bundle")
        config = IndexConfig.load(path)
        if config.backend not in _BACKENDS:
            raise BundleError(
                f"{str(path)!r} names the vector backend {config.backend!r}, which is not registered "
                f"(known: {sorted(_BACKENDS)}); import the module that registers it, or rebuild the bundle"
            )
        return _BACKENDS[config.backend].read(directory, config)

    @classmethod
    def _target(cls, config: IndexConfig) -> tuple[type[VectorIndex], IndexConfig]:
        target = backend(config.backend) if cls is VectorIndex else cls
        return target, dataclasses.replace(config, backend=target.name)

    @classmethod
    @abc.abstractmethod
    def create(cls, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig, *, tune: bool) -> Self:
        """This backend over ``vectors`` under ``ids`` (what :meth:`build` calls)."""

    @classmethod
    @abc.abstractmethod
    def create_empty(cls, dim: int, config: IndexConfig) -> Self:
        """This backend, empty (what :meth:`empty` calls)."""

    @classmethod
    @abc.abstractmethod
    def read(cls, directory: Path, config: IndexConfig) -> Self:
        """This backend's files in ``directory`` (what :meth:`load` calls); a damaged file is a ``BundleError``."""

    # -- using one ----------------------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """How many vectors the index holds."""

    @abc.abstractmethod
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed: np.ndarray | None = None,
        stored: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` (scores, ids) per query row, best first, ``k`` clipped to ``ntotal``; missing slots have id -1.

        ``allowed``: a boolean mask over ids, the only ids that may come back (raise ``NotImplementedError`` where
        the backend cannot filter; the caller then searches the subset exactly). ``stored``: the full-precision
        vectors (row = id), for a lossy backend to re-score its candidates exactly.
        """

    @abc.abstractmethod
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``vectors`` under ``ids``."""

    @abc.abstractmethod
    def remove(self, ids: np.ndarray) -> bool:
        """Remove ``ids``; ``False`` where this backend cannot remove (the caller rebuilds instead)."""

    @abc.abstractmethod
    def write(self, directory: Path) -> None:
        """Write this backend's own files (``files``) into ``directory``."""

    def save(self, directory: Path) -> None:
        """The backend's files and ``index.json`` (the config, backend named) into ``directory``."""
        self.write(directory)
        self.config.save(directory / INDEX_CONFIG)

    def record(self) -> dict[str, Any]:
        """The manifest's index entry: the resolved config (backend included) and what tuning measured."""
        record = self.config.to_dict()
        if self.tuning:
            record["tuning"] = self.tuning
        return record


@functools.lru_cache(maxsize=64)
def _removes(cls: type[VectorIndex], dim: int, config: IndexConfig) -> bool:
    # an empty IVF4096,SQ8 of dimension 384 takes ~8 ms to make and ask; IVF1048576 0.6 s
    try:
        return cls.empty(dim, config).remove(np.zeros(1, dtype=np.int64))
    except (ConfigError, BundleError):
        return False


def register(name: str, cls: type[VectorIndex]) -> None:
    """Make ``cls`` the vector backend called ``name`` (what ``IndexConfig.backend`` and ``index.json`` name)."""
    cls.name = name
    _BACKENDS[name] = cls


def backend(name: str) -> type[VectorIndex]:
    """The vector backend registered as ``name``."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown vector backend {name!r}; choose one of {sorted(_BACKENDS)}") from None


def backends() -> list[str]:
    """The names of the registered vector backends."""
    return sorted(_BACKENDS)


def index_files() -> frozenset[str]:
    """Every file a registered vector backend writes (a catalogue change rewrites them, never carries them)."""
    return frozenset(name for cls in _BACKENDS.values() for name in cls.files)
