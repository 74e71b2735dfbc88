"""The behaviour every vector backend owes the bundle (build, add/remove, filtered search, save/load, recall against
brute force), run over each registered backend, a test-only one included: a new backend is one module plus one
``register`` line, as ``ListIndex`` below shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
import pytest

from matching.config import IndexConfig
from matching.errors import BundleError, ConfigError
from matching.layout import INDEX_CONFIG
from matching.metrics import neighbour_recall
from matching.vectors import VectorIndex, backends, register

DIM, N, K = 16, 300, 10


class ListIndex(VectorIndex):
    """A test-only backend: a plain list of (id, vector) pairs, searched one pair at a time."""

    files: ClassVar[tuple[str, ...]] = ("index.list.json",)

    def __init__(self, pairs: list[tuple[int, list[float]]], config: IndexConfig) -> None:
        super().__init__(config)
        self.pairs = pairs

    @classmethod
    def create(cls, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig, *, tune: bool = True) -> Self:
        return cls([(int(i), [float(x) for x in v]) for i, v in zip(ids, vectors, strict=True)], config)

    @classmethod
    def create_empty(cls, dim: int, config: IndexConfig) -> Self:
        return cls([], config)

    @property
    def ntotal(self) -> int:
        return len(self.pairs)

    def search(
        self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None, stored: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(k, self.ntotal))
        scores, ids = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        for row, q in enumerate(np.atleast_2d(queries)):
            ranked = sorted(
                ((float(np.dot(q, v)), i) for i, v in self.pairs if allowed is None or bool(allowed[i])),
                key=lambda pair: -pair[0],
            )[:k]
            for col, (score, i) in enumerate(ranked):
                scores[row, col], ids[row, col] = score, i
        return scores, ids

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.pairs += ListIndex.create(vectors, ids, self.config).pairs

    def remove(self, ids: np.ndarray) -> bool:
        gone = set(ids.tolist())
        self.pairs = [(i, v) for i, v in self.pairs if i not in gone]
        return True

    def write(self, directory: Path) -> None:
        (directory / self.files[0]).write_text(json.dumps(self.pairs), encoding="utf-8")

    @classmethod
    def read(cls, directory: Path, config: IndexConfig) -> Self:
        pairs = json.loads((directory / cls.files[0]).read_text(encoding="utf-8"))
        return cls([(int(i), list(v)) for i, v in pairs], config)


register("list", ListIndex)  # the one registry line a new backend needs

BACKENDS = backends()


def test_the_suite_covers_the_built_in_backends_and_the_test_one() -> None:
    assert {"faiss", "exact", "list"} <= set(BACKENDS)


def _unit(rows: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


VECTORS, QUERIES = _unit(N, 0), _unit(25, 1)


def _brute(queries: np.ndarray, ids: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """The exact top ``k`` over the rows ``ids`` of VECTORS (ids = rows)."""
    scores = queries @ VECTORS[ids].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def _build(name: str, ids: np.ndarray | None = None) -> VectorIndex:
    ids = np.arange(N, dtype=np.int64) if ids is None else ids
    return VectorIndex.build(VECTORS[ids], ids, IndexConfig(backend=name))


@pytest.mark.parametrize("name", BACKENDS)
def test_build_finds_the_exact_top_k(name: str) -> None:
    index = _build(name)
    assert index.name == name
    assert index.config.backend == name
    assert index.ntotal == N
    scores, ids = index.search(QUERIES, K)
    want_scores, want_ids = _brute(QUERIES, np.arange(N))
    assert ids.shape == (len(QUERIES), K)
    assert neighbour_recall(ids, want_ids, K) == 1.0
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_k_is_clipped_to_what_the_index_holds(name: str) -> None:
    _, ids = _build(name, np.arange(5, dtype=np.int64)).search(QUERIES[:2], 50)
    assert ids.shape == (2, 5)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", BACKENDS)
def test_add_and_remove(name: str) -> None:
    index = VectorIndex.empty(DIM, IndexConfig(backend=name))
    assert index.name == name
    assert index.ntotal == 0
    index.add(VECTORS[: N // 2], np.arange(N // 2, dtype=np.int64))
    index.add(VECTORS[N // 2 :], np.arange(N // 2, N, dtype=np.int64))
    gone = np.arange(0, N, 3, dtype=np.int64)
    assert index.remove(gone) is True
    live = np.setdiff1d(np.arange(N), gone)
    assert index.ntotal == len(live)
    _, ids = index.search(QUERIES, K)
    assert not np.isin(ids, gone).any()
    assert neighbour_recall(ids, _brute(QUERIES, live)[1], K) == 1.0
    assert index.remove(np.zeros(0, dtype=np.int64)) is True
    index.add(np.empty((0, 0), np.float32), np.empty(0, np.int64))  # what a change that only removes adds
    assert index.ntotal == len(live)


@pytest.mark.parametrize("name", BACKENDS)
def test_filtered_search_returns_allowed_ids_only(name: str) -> None:
    index = _build(name)
    allowed = np.zeros(N, dtype=bool)
    allowed[::7] = True
    _, ids = index.search(QUERIES, K, allowed=allowed)
    assert allowed[ids].all()
    assert neighbour_recall(ids, _brute(QUERIES, np.flatnonzero(allowed))[1], K) == 1.0
    few = np.zeros(N, dtype=bool)
    few[[3, 40]] = True
    _, ids = index.search(QUERIES[:3], K, allowed=few)
    assert (np.sort(ids[:, :2], axis=1) == [3, 40]).all()
    assert (ids[:, 2:] == -1).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_save_and_load_reproduce_the_results(name: str, tmp_path: Path) -> None:
    index = _build(name, np.arange(N, dtype=np.int64))
    index.remove(np.array([1, 2, 3], dtype=np.int64))
    index.save(tmp_path)
    assert json.loads((tmp_path / INDEX_CONFIG).read_text(encoding="utf-8"))["backend"] == name
    assert {p.name for p in tmp_path.iterdir()} == {INDEX_CONFIG, *type(index).files}
    loaded = VectorIndex.load(tmp_path)
    assert type(loaded) is type(index)
    assert loaded.config == index.config
    assert loaded.ntotal == N - 3
    for a, b in zip(index.search(QUERIES, K), loaded.search(QUERIES, K), strict=True):
        np.testing.assert_array_equal(a, b)
    assert index.record()["backend"] == name


@pytest.mark.parametrize("name", BACKENDS)
def test_stored_vectors_leave_an_exact_search_exact(name: str) -> None:
    index = _build(name)
    scores, ids = index.search(QUERIES, K, stored=VECTORS)
    want_scores, want_ids = _brute(QUERIES, np.arange(N))
    assert neighbour_recall(ids, want_ids, K) == 1.0
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_a_backend_class_builds_itself_whatever_the_config_names() -> None:
    index = ListIndex.build(VECTORS, np.arange(N, dtype=np.int64), IndexConfig(backend="faiss"))
    assert isinstance(index, ListIndex)
    assert index.config.backend == "list"


def test_an_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown vector backend 'nope'"):
        VectorIndex.empty(DIM, IndexConfig(backend="nope"))


def test_an_index_record_naming_an_unregistered_backend_is_a_bundle_error(tmp_path: Path) -> None:
    _build("exact").save(tmp_path)
    IndexConfig(backend="gone").save(tmp_path / INDEX_CONFIG)
    with pytest.raises(BundleError, match=r"'gone', which is not registered"):
        VectorIndex.load(tmp_path)


def test_an_index_record_without_a_backend_is_faiss(tmp_path: Path) -> None:
    """Bundles from before the backends: index.json has no ``backend``."""
    _build("faiss").save(tmp_path)
    record = json.loads((tmp_path / INDEX_CONFIG).read_text(encoding="utf-8"))
    del record["backend"]
    (tmp_path / INDEX_CONFIG).write_text(json.dumps(record), encoding="utf-8")
    loaded = VectorIndex.load(tmp_path)
    assert loaded.name == "faiss"
    assert loaded.ntotal == N


def test_a_damaged_exact_index_is_a_bundle_error(tmp_path: Path) -> None:
    index = _build("exact")
    index.save(tmp_path)
    (tmp_path / type(index).files[0]).write_bytes(b"not a zip")
    with pytest.raises(BundleError, match=r"cannot read the exact index .*rebuild the bundle"):
        VectorIndex.load(tmp_path)


# -- in a bundle ----------------------------------------------------------------------------------------------


def test_a_bundle_on_the_exact_backend_answers_as_the_faiss_one(tmp_path: Path, tiny_encoder: Any) -> None:
    """The backend is recorded, kept by add/remove/compact, and its file rewritten (never carried) by each."""
    from matching import Matcher
    from matching.bundle import current_generation, read_manifest
    from tests.conftest import make_catalogue

    def hits(m: Matcher) -> list[tuple[Any, float]]:
        return [(h.id, round(h.score, 4)) for h in m.search("red yoga mat", k=len(m), rerank=False)]

    new = pd.DataFrame({"id": [5001, 5002], "title": ["Hooli black yoga mat", "Vandelay red camping tent"]})
    built = {}
    for name in ("faiss", "exact"):
        m = Matcher.build(
            make_catalogue(),
            tmp_path / name,
            encoder=tiny_encoder,
            show_progress=False,
            retrieval="dense",
            index_config=IndexConfig(backend=name),
        )
        m.add(new, show_progress=False)
        m.remove([5001], missing_ok=False)
        m.compact(show_progress=False)
        built[name] = m
    exact = built["exact"]
    assert exact.path is not None
    gen = current_generation(exact.path)
    assert read_manifest(gen).index["backend"] == "exact"
    assert {"index.exact.npz", INDEX_CONFIG} <= {p.name for p in gen.iterdir()}
    assert not (gen / "index.faiss").exists()
    assert Matcher.load(exact.path).index.name == "exact"
    assert hits(exact) == hits(built["faiss"])
    for m in built.values():
        m.close()
