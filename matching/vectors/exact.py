"""The exact vector backend: every vector kept as float32 in memory and searched by brute force with NumPy.

Exact by construction (no tuning, no refine); a filter searches only the allowed rows. It suits small catalogues
and tests; its file holds the ids and the vectors (``index.exact.npz``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import ClassVar, Self

import numpy as np

from matching.config import IndexConfig
from matching.errors import BundleError
from matching.exact import exact_top_k
from matching.layout import EXACT_INDEX_FILE
from matching.vectors.base import VectorIndex


class ExactIndex(VectorIndex):
    """Brute-force inner product over the vectors it holds (row order = insertion order)."""

    files: ClassVar[tuple[str, ...]] = (EXACT_INDEX_FILE,)

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig) -> None:
        super().__init__(config)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)

    @classmethod
    def create(cls, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig, *, tune: bool = True) -> Self:
        return cls(np.array(vectors, dtype=np.float32), np.array(ids, dtype=np.int64), config)

    @classmethod
    def create_empty(cls, dim: int, config: IndexConfig) -> Self:
        return cls(np.zeros((0, dim), dtype=np.float32), np.zeros(0, dtype=np.int64), config)

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed: np.ndarray | None = None,
        stored: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = max(1, min(int(k), self.ntotal))
        rows = np.arange(self.ntotal)
        if allowed is not None:
            mask = np.asarray(allowed, dtype=bool)
            inside = self.ids < len(mask)
            rows = rows[inside][mask[self.ids[inside]]]
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        if len(rows):
            found_scores, positions = exact_top_k(self.vectors[rows], q, k)
            scores[:, : positions.shape[1]] = found_scores
            ids[:, : positions.shape[1]] = self.ids[rows[positions]]
        return scores, ids

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if not len(ids):  # a change that only removes adds a (0, 0) block
            return
        self.vectors = np.concatenate([self.vectors, np.asarray(vectors, dtype=np.float32)])
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])

    def remove(self, ids: np.ndarray) -> bool:
        keep = ~np.isin(self.ids, np.asarray(ids, dtype=np.int64))
        self.vectors, self.ids = self.vectors[keep], self.ids[keep]
        return True

    def write(self, directory: Path) -> None:
        with (directory / EXACT_INDEX_FILE).open("wb") as f:
            np.savez(f, vectors=self.vectors, ids=self.ids)

    @classmethod
    def read(cls, directory: Path, config: IndexConfig) -> Self:
        path = directory / EXACT_INDEX_FILE
        if not path.is_file():
            raise BundleError(f"bundle index file {str(path)!r} is missing; rebuild the bundle")
        try:
            with np.load(path, allow_pickle=False) as data:
                vectors, ids = data["vectors"], data["ids"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise BundleError(f"cannot read the exact index {str(path)!r} ({exc}); rebuild the bundle") from None
        if vectors.ndim != 2 or vectors.dtype != np.float32 or ids.shape != (len(vectors),) or ids.dtype != np.int64:
            raise BundleError(f"the exact index {str(path)!r} holds arrays of the wrong shape; rebuild the bundle")
        return cls(vectors, ids, config)
