"""VectorIndex: exactness against NumPy, persistence, factories and search parameters."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import assert_same_ranking

from matching.config import IndexConfig
from matching.errors import BundleError, ConfigError
from matching.layout import INDEX_CONFIG as CONFIG_FILE
from matching.layout import INDEX_FILE
from matching.vectors import VectorIndex, assign
from matching.vectors import faiss as faiss_index
from matching.vectors.faiss import IVF_TRAIN_ITERATIONS
from matching.vectors.kmeans import TWO_LEVEL_MIN_LISTS, two_level_centroids

N, DIM = 300, 16


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded unit vectors, arbitrary distinct int64 ids (large, negative-free, unsorted) and queries."""
    rng = np.random.default_rng(1234)
    vectors = unit_rows(rng, N)
    ids = rng.choice(np.int64(2) ** 40, size=N, replace=False).astype(np.int64)
    queries = unit_rows(rng, 7)
    return vectors, ids, queries


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


@pytest.mark.parametrize("k", [1, 10, N], ids=lambda k: f"k-{k}")
def test_flat_search_equals_brute_force(data: tuple[np.ndarray, ...], k: int) -> None:
    vectors, ids, queries = data
    index = VectorIndex.build(vectors, ids)
    assert index.ntotal == N
    scores, found = index.search(queries, k)
    expected_scores, expected_ids = brute_force(vectors, ids, queries, k)
    assert found.dtype == np.int64
    assert scores.shape == found.shape == (len(queries), k)
    for q in range(len(queries)):
        assert_same_ranking(
            found[q].tolist(), scores[q].tolist(), expected_ids[q].tolist(), expected_scores[q].tolist(), 1e-5
        )


def test_a_single_query_vector_is_accepted(data: tuple[np.ndarray, ...]) -> None:
    vectors, ids, queries = data
    index = VectorIndex.build(vectors, ids)
    scores, found = index.search(queries[0], 5)
    assert scores.shape == found.shape == (1, 5)
    np.testing.assert_array_equal(found[0], brute_force(vectors, ids, queries[:1], 5)[1][0])


def test_k_is_capped_at_the_number_of_vectors(data: tuple[np.ndarray, ...]) -> None:
    vectors, ids, queries = data
    index = VectorIndex.build(vectors[:5], ids[:5])
    scores, found = index.search(queries, 50)
    assert scores.shape == found.shape == (len(queries), 5)
    assert (found >= 0).all()
    assert {int(i) for i in found[0]} == {int(i) for i in ids[:5]}


def test_a_vector_finds_itself_first(data: tuple[np.ndarray, ...]) -> None:
    vectors, ids, _ = data
    scores, found = VectorIndex.build(vectors, ids).search(vectors[:20], 1)
    np.testing.assert_array_equal(found[:, 0], ids[:20])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_save_and_load_give_identical_results(data: tuple[np.ndarray, ...], tmp_path: Path) -> None:
    vectors, ids, queries = data
    index = VectorIndex.build(vectors, ids)
    index.save(tmp_path)
    assert (tmp_path / INDEX_FILE).is_file()
    assert (tmp_path / CONFIG_FILE).is_file()
    loaded = VectorIndex.load(tmp_path)
    assert loaded.config == index.config
    assert loaded.ntotal == N
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("factory", ["NotAnIndex", "IVF,Flat", "Flat,Flat,Flat"])
def test_invalid_factory_is_a_config_error(data: tuple[np.ndarray, ...], factory: str) -> None:
    vectors, ids, _ = data
    with pytest.raises(ConfigError, match="index factory"):
        VectorIndex.build(vectors, ids, IndexConfig(factory=factory))


def test_ivf_trains_and_with_every_list_probed_is_exact(data: tuple[np.ndarray, ...], tmp_path: Path) -> None:
    vectors, ids, queries = data
    index = VectorIndex.build(vectors, ids, IndexConfig(factory="IVF4,Flat", nprobe=4))
    assert index.ntotal == N
    assert index.index.is_trained
    scores, found = index.search(queries, 10)
    expected_scores, expected_ids = brute_force(vectors, ids, queries, 10)
    for q in range(len(queries)):
        assert_same_ranking(
            found[q].tolist(), scores[q].tolist(), expected_ids[q].tolist(), expected_scores[q].tolist(), 1e-5
        )
    # nprobe is part of the saved config, so a reloaded index is exact too.
    index.save(tmp_path)
    loaded = VectorIndex.load(tmp_path)
    assert loaded.config.nprobe == 4
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], found)


def test_the_ivf_quantizer_takes_fifteen_k_means_iterations() -> None:
    """Its centroids are FAISS's own training with 15 iterations over the same points (all of them, in row order,
    below the training sample's size), and differ from FAISS's default 25."""
    vectors = unit_rows(np.random.default_rng(5), 64 * 40)  # uniform points: k-means is still moving at 15
    index = VectorIndex.build(vectors, np.arange(len(vectors)), IndexConfig(factory="IVF64,SQ8", nprobe=8))
    assert IVF_TRAIN_ITERATIONS == 15

    def centroids(found: object) -> np.ndarray:
        ivf = faiss.extract_index_ivf(found)
        return np.asarray(ivf.quantizer.reconstruct_n(0, ivf.nlist))

    def trained(niter: int | None) -> np.ndarray:
        own = faiss.index_factory(DIM, "IVF64,SQ8", faiss.METRIC_INNER_PRODUCT)
        if niter is not None:
            faiss.extract_index_ivf(own).cp.niter = niter
        own.train(vectors)
        return centroids(own)

    np.testing.assert_array_equal(centroids(index.index), trained(15))
    assert not np.array_equal(centroids(index.index), trained(None))


def test_large_ivf_quantizers_train_by_two_level_k_means(monkeypatch: pytest.MonkeyPatch) -> None:
    """From TWO_LEVEL_MIN_LISTS lists up the quantizer holds two_level_centroids of the training points: nlist unit
    centroids (skewed clusters included) whose k-means objective is within 1% of FAISS's flat training, and the
    index with every list probed finds what brute force finds."""
    assert TWO_LEVEL_MIN_LISTS == 2048
    monkeypatch.setattr(faiss_index, "TWO_LEVEL_MIN_LISTS", 64)
    rng = np.random.default_rng(8)
    centres = unit_rows(rng, 12)
    # twelve clusters of very different sizes, so the second level's lists are shared out unevenly
    sizes = rng.integers(20, 600, size=12)
    points = np.concatenate([c + 0.35 * rng.standard_normal((s, DIM)) for c, s in zip(centres, sizes, strict=True)])
    vectors = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(len(vectors))
    index = VectorIndex.build(vectors, ids, IndexConfig(factory="IVF64,Flat", nprobe=64))
    ivf = faiss.extract_index_ivf(index.index)
    got = np.asarray(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    np.testing.assert_array_equal(got, two_level_centroids(vectors, 64, IVF_TRAIN_ITERATIONS))
    assert got.shape == (64, DIM)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    flat = faiss.index_factory(DIM, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(flat).cp.niter = IVF_TRAIN_ITERATIONS
    flat.train(vectors)
    theirs = np.asarray(faiss.extract_index_ivf(flat).quantizer.reconstruct_n(0, 64))

    def objective(centroids: np.ndarray) -> float:
        return float((vectors @ centroids.T).max(axis=1).mean())

    assert objective(got) >= 0.99 * objective(theirs)
    queries = unit_rows(rng, 9)
    scores, found = index.search(queries, 10)
    want_scores, want = brute_force(vectors, ids, queries, 10)
    np.testing.assert_array_equal(found, want)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # a quantizer that must train itself (SQ8) is trained by FAISS as before
    coded = VectorIndex.build(vectors, ids, IndexConfig(factory="IVF64(SQ8),Flat", nprobe=64))
    assert faiss.extract_index_ivf(coded.index).quantizer.ntotal == 64


def test_ivf_with_one_probe_returns_valid_hits(data: tuple[np.ndarray, ...]) -> None:
    vectors, ids, queries = data
    index = VectorIndex.build(vectors, ids, IndexConfig(factory="IVF4,Flat"))
    scores, found = index.search(queries, 5)
    valid = found[found >= 0]
    assert valid.size > 0
    assert set(valid.tolist()) <= set(ids.tolist())
    assert np.all(np.diff(scores, axis=1)[found[:, 1:] >= 0] <= 1e-6)  # descending where filled


def test_hnsw_factory_with_ef_search(data: tuple[np.ndarray, ...]) -> None:
    vectors, ids, queries = data
    index = VectorIndex.build(vectors, ids, IndexConfig(factory="HNSW16", ef_search=N))
    _, found = index.search(queries, 1)
    np.testing.assert_array_equal(found[:, 0], brute_force(vectors, ids, queries, 1)[1][:, 0])


def test_load_without_an_index_file_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"index\.faiss"):
        VectorIndex.load(tmp_path)


def test_load_of_a_garbage_index_file_is_a_bundle_error(tmp_path: Path) -> None:
    (tmp_path / INDEX_FILE).write_bytes(b"\x00garbage" * 10)
    IndexConfig().save(tmp_path / CONFIG_FILE)
    with pytest.raises(BundleError, match="cannot read FAISS index"):
        VectorIndex.load(tmp_path)


def test_search_parameter_that_does_not_fit_the_factory_is_a_config_error(
    data: tuple[np.ndarray, ...],
) -> None:
    vectors, ids, _ = data
    with pytest.raises(ConfigError, match="nprobe"):
        VectorIndex.build(vectors, ids, IndexConfig(factory="Flat", nprobe=4))


def test_a_filter_widens_the_probes_by_its_share(data: tuple[np.ndarray, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    from matching.vectors import faiss as backend

    assert [backend.filter_widening(s) for s in (1.0, 0.5, 0.1, 0.01, 0.0)] == [2, 4, 8, 20, 1]
    vectors, _, queries = data
    ids = np.arange(N, dtype=np.int64)
    index = VectorIndex.build(vectors, ids, IndexConfig(factory="IVF16,Flat", nprobe=1))
    allowed = np.zeros(N, dtype=bool)
    allowed[::4] = True  # a quarter: 4 lists probed instead of 1
    widened = index.search(queries, 10, allowed=allowed)
    core = backend.core_index(index.index)
    core.nprobe = 4
    monkeypatch.setattr(backend, "filter_widening", lambda share: 1)
    scores, found = index.search(queries, 10, allowed=allowed)
    np.testing.assert_array_equal(widened[1], found)
    np.testing.assert_array_equal(widened[0], scores)
    assert set(found[found >= 0].tolist()) <= set(np.flatnonzero(allowed).tolist())
    core.nprobe = 16  # every list, widened past nlist: capped, still every list (exact over the allowed ids)
    monkeypatch.setattr(backend, "filter_widening", lambda share: 64)
    _, exact_ids = brute_force(vectors[allowed], ids[allowed], queries, 10)
    np.testing.assert_array_equal(index.search(queries, 10, allowed=allowed)[1], exact_ids)


def test_bf16_assignment_finds_the_float32_nearest_centroid() -> None:
    """nearest_centroids equals the exact (float64) argmax, also where bfloat16 alone ranks wrongly: centroids
    that differ by less than bfloat16 can see, each the clear float32 winner for some rows."""
    rng = np.random.default_rng(11)
    centres = unit_rows(rng, 40)
    # pairs of centroids 0.002 apart in cosine, within one bfloat16 step (~0.004 near 1) of each other
    close = unit_rows(rng, 40) * 0.045 + centres
    centroids = np.concatenate([centres, close / np.linalg.norm(close, axis=1, keepdims=True)]).astype(np.float32)
    points = centroids[rng.integers(0, 80, 3000)] + 0.01 * rng.standard_normal((3000, DIM)).astype(np.float32)
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    exact = points.astype(np.float64) @ centroids.astype(np.float64).T
    top2 = np.sort(exact, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5  # rows whose winner float32 arithmetic cannot mistake
    want = exact.argmax(axis=1)
    got = assign.nearest_centroids(points, centroids)
    np.testing.assert_array_equal(got[clear], want[clear])
    assert clear.mean() > 0.99
    rough = (torch.from_numpy(points).bfloat16() @ torch.from_numpy(centroids).bfloat16().T).float().numpy()
    assert (rough.argmax(axis=1) != want)[clear].sum() > 50  # the case the float32 re-score is there for
    quantizer = faiss.IndexFlatIP(DIM)
    quantizer.add(centroids)
    np.testing.assert_array_equal(got[clear], quantizer.search(points, 1)[1].ravel()[clear])

    # 30 centroids within bfloat16's error of each other: its top CANDIDATES often miss the float32 winner, and the
    # rows whose candidates are that close are scored against all of them in float32
    crowd = centres[0] + 0.02 * unit_rows(rng, 30)
    crowd = (crowd / np.linalg.norm(crowd, axis=1, keepdims=True)).astype(np.float32)
    near = crowd[rng.integers(0, 30, 500)] + 0.005 * rng.standard_normal((500, DIM)).astype(np.float32)
    near = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)
    exact = near.astype(np.float64) @ crowd.astype(np.float64).T
    top2 = np.sort(exact, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5
    want = exact.argmax(axis=1)
    rough_top = (torch.from_numpy(near).bfloat16() @ torch.from_numpy(crowd).bfloat16().T).topk(assign.CANDIDATES)
    missed = ~(rough_top.indices.numpy() == want[:, None]).any(axis=1)
    assert missed[clear].sum() > 5
    np.testing.assert_array_equal(assign.nearest_centroids(near, crowd)[clear], want[clear])


@pytest.mark.parametrize("factory", ["IVF32,SQ8", "IVF32,Flat", "IVF32,PQ8x4"])
def test_an_index_added_with_bf16_assignment_is_the_one_faiss_adds(
    factory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the assignment done here (forced on, whatever this CPU runs natively), the built index serialises to
    the same bytes as FAISS's own add_with_ids, through create and add alike; and it only applies to a bare IVF
    over inner product with a flat quantizer."""
    rng = np.random.default_rng(12)
    centres = unit_rows(rng, 32)
    points = centres[rng.integers(0, 32, 6000)] + 0.3 * rng.standard_normal((6000, DIM)).astype(np.float32)
    vectors = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(len(vectors), dtype=np.int64)
    config = IndexConfig(factory=factory, nprobe=4)
    plain = VectorIndex.build(vectors, ids, config, tune=False)
    plain.add(vectors[:1000], ids[:1000] + 10_000)
    monkeypatch.setattr(assign, "MIN_ROWS", 100)
    monkeypatch.setattr(assign, "cpu_has_native_bf16", lambda: True)
    calls: list[int] = []
    real = assign.nearest_centroids
    monkeypatch.setattr(assign, "nearest_centroids", lambda v, c: calls.append(len(v)) or real(v, c))
    ours = VectorIndex.build(vectors, ids, config, tune=False)
    ours.add(vectors[:1000], ids[:1000] + 10_000)
    assert calls == [6000, 1000]
    assert bytes(faiss.serialize_index(ours.index)) == bytes(faiss.serialize_index(plain.index))
    assert assign.flat_ip_centroids(faiss.index_factory(DIM, "IVF8,Flat", faiss.METRIC_L2)) is None
    assert assign.flat_ip_centroids(faiss.index_factory(DIM, "PCA8,IVF8,Flat", faiss.METRIC_INNER_PRODUCT)) is None
    assert assign.flat_ip_centroids(faiss.index_factory(DIM, "HNSW8", faiss.METRIC_INNER_PRODUCT)) is None
    # fast-scan packs its codes in blocks in its own add_with_ids: FAISS adds them
    fast_scan = faiss.index_factory(DIM, "IVF8,PQ8x4fs", faiss.METRIC_INNER_PRODUCT)
    fast_scan.train(vectors)
    assert assign.flat_ip_centroids(fast_scan) is None
    # a row that is not finite: FAISS's own add, which leaves it out of every list
    bad = vectors[:200].copy()
    bad[7, 3] = np.nan
    before = ours.index.ntotal
    ours.add(bad, np.arange(200, dtype=np.int64) + 50_000)
    assert calls == [6000, 1000]
    assert ours.index.ntotal == before + 200
