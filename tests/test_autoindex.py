"""autoindex: index choice by size and budget, exact refine, build-time tuning of nprobe/efSearch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch

from matching import exact
from matching.errors import BundleError
from matching.exact import exact_refine, exact_top_k
from matching.metrics import neighbour_recall as recall_at_k
from matching.metrics import tied_neighbour_recall
from matching.vectors.autoindex import (
    FLAT_MAX_FLOATS,
    IndexChoice,
    auto_tune,
    choice_for_factory,
    choose_index,
    default_memory_budget,
    ivf_nlist,
    retrieve,
    sample_queries,
    search_param_range,
    set_search_param,
    tune_search_params,
)

MiB = 2**20


def unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def clustered(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """A seeded Gaussian mixture of unit vectors."""
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, dim)))
    a = rng.integers(0, centres, n)
    return unit(c[a] + 0.5 / np.sqrt(dim) * rng.standard_normal((n, dim)) * 2.0)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20k clustered vectors, 300 noisy title queries and their exact top 10."""
    vectors = clustered(20_000, 32, 300, seed=7)
    queries, _ = sample_queries(vectors, 300, seed=8)
    _, exact = exact_top_k(vectors, queries, 10)
    return vectors, queries, exact


@pytest.fixture(scope="module")
def ivf(data: tuple[np.ndarray, ...]) -> Any:
    """IVF512,SQ8 over the 20k vectors, ids = rows, wrapped in an IndexIDMap as VectorIndex does."""
    return build(data[0], f"IVF{ivf_nlist(len(data[0]))},SQ8")


def build(vectors: np.ndarray, factory: str, *, wrap: bool = True) -> Any:
    base = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not base.is_trained:
        base.train(vectors)
    if not wrap:
        base.add(vectors)
        return base
    index = faiss.IndexIDMap(base)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return index


# -- choose_index ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 1_000, 40_000])
def test_small_catalogues_get_exact_flat(n: int) -> None:
    choice = choose_index(n, 384)
    assert choice.factory == "Flat"
    assert not choice.refine
    assert choice.refine_k(100) == 100
    assert choice.search_param is None


@pytest.mark.parametrize("n", [100_000, 1_000_000, 10_000_000])
def test_large_catalogues_get_ivf_over_codes_with_refine(n: int) -> None:
    choice = choose_index(n, 384)
    assert choice.factory == f"IVF{ivf_nlist(n)},SQ8"
    assert choice.refine
    assert choice.refine_k(100) > 100
    assert choice.search_param == "nprobe"
    assert choice.expected_bytes(n) <= default_memory_budget(n, 384)
    assert choice.train_size <= n


def test_the_default_budget_is_half_a_gib_per_million_at_dim_384() -> None:
    assert default_memory_budget(1_000_000, 384) == 512 * MiB
    assert default_memory_budget(1_000, 384) == 512 * MiB
    assert choose_index(1_000_000, 384).expected_bytes(1_000_000) <= 512 * MiB


def test_flat_threshold_scales_with_dimension() -> None:
    assert choose_index(FLAT_MAX_FLOATS // 384, 384).factory == "Flat"
    assert choose_index(FLAT_MAX_FLOATS // 384 + 1, 384).factory != "Flat"
    assert choose_index(FLAT_MAX_FLOATS // 768 + 1, 768).factory != "Flat"


@pytest.mark.parametrize("budget_mib", [1024, 400, 300, 150, 80, 40])
def test_the_memory_budget_is_respected_with_ever_smaller_codes(budget_mib: int) -> None:
    n = 1_000_000
    choice = choose_index(n, 384, memory_budget_bytes=budget_mib * MiB)
    assert choice.expected_bytes(n) <= budget_mib * MiB, choice.reason
    assert choice.refine
    larger = choose_index(n, 384, memory_budget_bytes=2 * budget_mib * MiB)
    assert larger.bytes_per_vector >= choice.bytes_per_vector


def test_a_budget_too_small_for_flat_picks_a_compressed_index_even_when_small() -> None:
    choice = choose_index(10_000, 384, memory_budget_bytes=5 * MiB)
    assert choice.factory.startswith("IVF")
    assert choice.refine
    assert choice.expected_bytes(10_000) <= 5 * MiB


def test_an_impossible_budget_returns_the_smallest_index_and_says_so() -> None:
    choice = choose_index(1_000_000, 384, memory_budget_bytes=MiB)
    assert "nothing fits" in choice.reason
    assert choice.factory.startswith("IVF")
    assert "PQ" in choice.factory


@pytest.mark.parametrize(("n", "nlist"), [(10, 1), (100, 2), (1_000, 16), (20_000, 512), (1_000_000, 4096)])
def test_the_number_of_lists_scales_with_n_and_keeps_lists_trainable(n: int, nlist: int) -> None:
    assert ivf_nlist(n) == nlist
    assert ivf_nlist(n) == 1 or n // ivf_nlist(n) >= 39
    assert ivf_nlist(10**9) == 16_384
    assert ivf_nlist(1_000_000, 16) == 16_384
    assert choose_index(1_000_000, 384, nlist_factor=8).factory == "IVF8192,SQ8"


@pytest.mark.parametrize("n", [50, 2_000])
def test_a_chosen_index_builds_at_small_n_and_its_size_estimate_holds(n: int) -> None:
    dim = 32
    budget = n * 4 * dim // 3  # below Flat's size
    choice = choose_index(n, dim, memory_budget_bytes=budget)
    assert choice.factory != "Flat"
    vectors = clustered(n, dim, 10, seed=1)
    index = faiss.IndexIDMap(faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT))
    index.train(vectors[: choice.train_size])
    index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
    size = faiss.serialize_index(index).nbytes
    assert size <= 1.2 * choice.expected_bytes(n) + 4096


def test_user_factories_get_refine_only_for_lossy_codes() -> None:
    assert not choice_for_factory("Flat", 10).refine
    assert not choice_for_factory("HNSW32", 10).refine
    assert choice_for_factory("HNSW32", 10).search_param == "efSearch"
    sq = choice_for_factory("IVF256,SQ8", 100_000)
    assert sq.refine
    assert sq.search_param == "nprobe"
    assert sq.train_size >= 256 * 39
    assert choice_for_factory("OPQ32,IVF1024,PQ32", 10**6).refine_factor > sq.refine_factor


# -- exact refine --------------------------------------------------------------------------------------------------


def test_exact_refine_equals_brute_force_on_the_candidates(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    stored = unit(rng.standard_normal((500, 16)))
    path = tmp_path / "vectors.f32"
    stored.tofile(path)
    memmap = np.memmap(path, dtype=np.float32, mode="r", shape=stored.shape)
    queries = unit(rng.standard_normal((6, 16)))
    cand = np.stack([rng.choice(500, 40, replace=False) for _ in range(6)]).astype(np.int64)
    cand[1, 30:] = -1  # padding, as FAISS returns when it has fewer results
    cand[2, :] = -1  # nothing at all
    scores, ids = exact_refine(queries, cand, memmap, 10)
    assert scores.shape == ids.shape == (6, 10)
    assert ids.dtype == np.int64
    assert scores.dtype == np.float32
    for q in range(6):
        valid = cand[q][cand[q] >= 0]
        s = stored[valid] @ queries[q]
        order = np.argsort(-s, kind="stable")[:10]
        np.testing.assert_array_equal(ids[q][: len(order)], valid[order])
        np.testing.assert_allclose(scores[q][: len(order)], s[order], rtol=1e-5, atol=1e-6)
    assert (ids[2] == -1).all()
    assert np.isneginf(scores[2]).all()


def test_exact_refine_pads_when_fewer_candidates_than_k() -> None:
    stored = unit(np.random.default_rng(0).standard_normal((5, 4)))
    scores, ids = exact_refine(stored[:1], np.array([[3, -1, 1]]), stored, 5)
    assert ids[0].tolist()[:2] == [1, 3] or ids[0].tolist()[:2] == [3, 1]
    assert ids[0].tolist()[2:] == [-1, -1, -1]
    assert np.isneginf(scores[0, 2:]).all()


def test_exact_top_k_in_blocks_equals_a_full_sort() -> None:
    rng = np.random.default_rng(5)
    vectors = unit(rng.standard_normal((1_000, 8)))
    queries = unit(rng.standard_normal((4, 8)))
    scores, ids = exact_top_k(vectors, queries, 7, block=128)
    full = queries @ vectors.T
    np.testing.assert_array_equal(ids, np.argsort(-full, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :7], rtol=1e-5)


@pytest.mark.parametrize("block", [3, 16, 128, 16_384])
def test_exact_top_k_breaks_ties_by_row_order(block: int) -> None:
    """Rows repeated across blocks (equal scores) come in row order, as a stable full sort has them, whatever
    the block size (smaller than k too). Small whole numbers, so every score is exact: a float32 GEMM's last bit
    may depend on the block's shape (OpenBLAS on an AMD EPYC: 1,330 of these 3,000 scores differ by one unit in
    the last place between blocks of 3 rows and one product of 600 rows, with unit vectors), which is the BLAS's
    rounding, not the order this checks."""
    rng = np.random.default_rng(6)
    distinct = rng.integers(-3, 4, (40, 8)).astype(np.float32)
    vectors = distinct[rng.integers(0, 40, 600)]
    queries = rng.integers(-3, 4, (5, 8)).astype(np.float32)
    full = queries @ vectors.T
    for k in (1, 9, 30):
        scores, ids = exact_top_k(vectors, queries, k, block=block)
        np.testing.assert_array_equal(ids, np.argsort(-full, axis=1, kind="stable")[:, :k])
        np.testing.assert_array_equal(scores, np.take_along_axis(full, ids, axis=1))
    assert exact_top_k(vectors, queries, 0)[1].shape == (5, 0)


def test_exact_top_k_ranks_a_score_that_is_not_a_number_last() -> None:
    """A stored row of NaN, and a query of NaN: every query still gets k rows (NaN scores as -inf, after every
    number, in row order), as a stable sort with NaN last has them; no queries give (0, k)."""
    rng = np.random.default_rng(7)
    vectors = unit(rng.standard_normal((300, 8)))
    vectors[5] = np.nan
    queries = unit(rng.standard_normal((3, 8)))
    queries[1] = np.nan
    full = queries @ vectors.T
    want = np.argsort(-np.where(np.isnan(full), -np.inf, full), axis=1, kind="stable")
    for k in (4, 300):
        scores, ids = exact_top_k(vectors, queries, k, block=64)
        np.testing.assert_array_equal(ids, want[:, :k])
        assert np.isneginf(scores[1]).all()
    assert np.isneginf(exact_top_k(vectors, queries, 300)[0][0, -1])
    empty = exact_top_k(vectors, np.zeros((0, 8), dtype=np.float32), 4)
    assert empty[0].shape == empty[1].shape == (0, 4)


@pytest.fixture
def bf16_screen(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bfloat16 screen on, whatever this CPU (emulated where it has no native bfloat16); counts the blocks it
    screened."""
    monkeypatch.setattr(exact, "cpu_has_native_bf16", lambda: True)
    calls: list[int] = []
    real = exact._Screen.entering

    def counting(self: Any, chunk: np.ndarray, kth: np.ndarray) -> Any:
        out = real(self, chunk, kth)
        if out is not None:  # None: the block is scored in float32
            calls.append(len(chunk))
        return out

    monkeypatch.setattr(exact._Screen, "entering", counting)
    return calls


@pytest.mark.parametrize("spread", [1.0, 0.01, 0.0])
def test_screened_top_k_finds_the_exact_rows(bf16_screen: list[int], spread: float) -> None:
    """Rows spread around the queries (0.01: scores closer than bfloat16 tells apart; 0: every row one of 50 equal
    ones): the rows a full sort finds, scores to float32's rounding. Where scores are closer than that (0.01, 0),
    which of them comes first is float32's rounding (the float32 GEMM's order differs too): the scores of the rows
    found are the best k."""
    rng = np.random.default_rng(11)
    queries = unit(rng.standard_normal((6, 24)))
    around = queries[rng.integers(0, 6, 3_000)] + spread * rng.standard_normal((3_000, 24)).astype(np.float32)
    vectors = unit(around) if spread else np.repeat(unit(rng.standard_normal((60, 24))), 50, axis=0)
    full = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    for k in (1, 10, 80):
        scores, ids = exact_top_k(vectors, queries, k, block=256, screened=True)
        if spread == 1.0:
            np.testing.assert_array_equal(ids, np.argsort(-full, axis=1, kind="stable")[:, :k])
        best = -np.sort(-full, axis=1)[:, :k]
        np.testing.assert_allclose(np.take_along_axis(full, ids, axis=1), best, atol=1e-6)
        np.testing.assert_allclose(scores, best, atol=1e-6)
        assert (np.diff(scores, axis=1) <= 0).all()
    assert len(bf16_screen) == 3 * 11  # every block past the first, for each k


def test_the_screen_keeps_a_row_that_bfloat16_rounds_below_the_kth_best(bf16_screen: list[int]) -> None:
    """The worst case of bfloat16's rounding, built by hand. Every component of the query and of the row ``t`` lies
    just below a rounding midpoint (1 + 2**-8), so both round down to 1 and t's bfloat16 score is 2**-7 of it too
    low. The k rows ``b`` of the first block score 0.12 less than t in float32, but half their components round
    up: with rounded inputs they score 0.25 more than t. A screen whose margin were 2**-8 instead of 2**-6 would
    skip t's block (checked)."""
    d, k, e = 64, 4, 2.0**-14
    mid = 1 + 2.0**-8
    t = np.full(d, mid - e)
    b = np.concatenate([np.full(d // 2, mid + e), np.ones(d // 2)])  # the second half exact in bfloat16
    queries = np.stack([t, 3 * t]).astype(np.float32)  # the second: its margin scales with its norm
    assert (queries[0] @ b) < (queries[0] @ t) - 0.1  # b is worse in exact arithmetic ...
    rounded = torch.from_numpy(np.stack([t, b]).astype(np.float32)).to(torch.bfloat16).float().numpy()
    assert rounded[1].sum() > rounded[0].sum()  # ... and better once rounded
    filler = -np.ones((16, d))  # rows no query wants
    vectors = np.concatenate([np.repeat(b[None], k, axis=0), filler[k:], filler, t[None], filler[1:]])
    _, ids = exact_top_k(vectors.astype(np.float32), queries, k, block=16, screened=True)
    assert ids.tolist() == [[32, 0, 1, 2], [32, 0, 1, 2]]
    assert bf16_screen == [16, 16]  # both blocks past the first went through the screen


def test_a_screened_block_that_is_not_finite_is_scored_in_float32(bf16_screen: list[int]) -> None:
    rng = np.random.default_rng(7)
    vectors = unit(rng.standard_normal((300, 8)))
    vectors[205] = np.nan
    queries = unit(rng.standard_normal((3, 8)))
    full = queries @ vectors.T
    want = np.argsort(-np.where(np.isnan(full), -np.inf, full), axis=1, kind="stable")
    _, ids = exact_top_k(vectors, queries, 4, block=64, screened=True)
    np.testing.assert_array_equal(ids, want[:, :4])
    assert bf16_screen == [64, 64, 44]  # blocks 1, 2 and 4 (of rows 64-299); block 3 holds the NaN
    queries[1] = np.nan  # a query that is not finite: no screen at all
    exact_top_k(vectors, queries, 4, block=64, screened=True)
    assert len(bf16_screen) == 3


def test_sample_queries_are_seeded_unit_vectors_near_their_source() -> None:
    vectors = clustered(2_000, 32, 10, seed=2)
    a, rows = sample_queries(vectors, 100, noise=0.75, seed=1)
    b, _ = sample_queries(vectors, 100, noise=0.75, seed=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    cos = np.sum(a * vectors[rows], axis=1)
    assert 0.7 < cos.mean() < 0.9  # ~ 1 / sqrt(1 + 0.75**2) = 0.8


# -- tuning --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("refine", [True, False], ids=["refine", "no-refine"])
def test_tuning_reaches_the_target_with_the_smallest_nprobe(
    data: tuple[np.ndarray, ...], ivf: Any, refine: bool
) -> None:
    vectors, queries, exact = data
    index = ivf
    stored = vectors if refine else None
    out = tune_search_params(index, queries, exact, k=10, target_recall=0.95, refine=stored, candidates=40)
    assert out["param"] == "nprobe"
    assert out["reached"]
    nprobe = out["value"]
    assert out["recall"] >= 0.95
    assert faiss.extract_index_ivf(index).nprobe == nprobe  # left set
    _, found = retrieve(index, queries, 10, stored_vectors=stored, candidates=40)
    assert recall_at_k(found, exact, 10) == pytest.approx(out["recall"])
    if nprobe > 1:
        set_search_param(index, "nprobe", nprobe - 1)
        _, found = retrieve(index, queries, 10, stored_vectors=stored, candidates=40)
        assert recall_at_k(found, exact, 10) < 0.95
        assert out["evaluated"][nprobe - 1] < 0.95


@pytest.mark.parametrize("start", [2, 4, 7, 64])
def test_tuning_from_another_start_finds_the_same_value(data: tuple[np.ndarray, ...], ivf: Any, start: int) -> None:
    vectors, queries, exact = data
    kwargs: dict[str, Any] = {"k": 10, "target_recall": 0.95, "refine": vectors, "candidates": 40}
    one = tune_search_params(ivf, queries, exact, **kwargs)
    other = tune_search_params(ivf, queries, exact, start=start, **kwargs)
    assert (other["value"], other["recall"], other["reached"]) == (one["value"], one["recall"], one["reached"])
    assert start in other["evaluated"]
    if one["value"] > 1:
        assert other["evaluated"][one["value"] - 1] < 0.95  # the one below was measured to miss


def test_tied_recall_lets_equal_rows_stand_for_each_other() -> None:
    """Hand-computed: query 0's exact top 2 is row 5 (0.9) and one of rows 6 and 7 (0.8 both); finding row 7 is a
    hit, though the exact list kept row 6. Query 1 finds one of its two (row 3's 0.55 is below its 2nd best)."""
    exact_ids = np.array([[5, 6], [1, 2]])
    exact_scores = np.array([[0.9, 0.8], [0.7, 0.6]], dtype=np.float32)
    found_ids = np.array([[5, 7], [1, 3]])
    found_scores = np.array([[0.9, 0.8], [0.7, 0.55]], dtype=np.float32)
    assert recall_at_k(found_ids, exact_ids, 2) == 0.5
    assert tied_neighbour_recall(found_ids, found_scores, exact_ids, exact_scores, 2) == 0.75
    # nothing found (-1, -inf) is no hit; an exact list shorter than k (-1, -inf padding) counts what it has
    nothing = np.full((1, 2), -1)
    assert tied_neighbour_recall(nothing, np.full((1, 2), -np.inf), exact_ids[:1], exact_scores[:1], 2) == 0.0
    padded_ids, padded = np.array([[5, -1]]), np.array([[0.9, -np.inf]], dtype=np.float32)
    assert tied_neighbour_recall(np.array([[5, 8]]), np.array([[0.9, 0.1]]), padded_ids, padded, 2) == 1.0
    # a listed id counts whatever its score's last bits (another summation order than the exact list's)
    assert tied_neighbour_recall(exact_ids, exact_scores - 1e-5, exact_ids, exact_scores, 2) == 1.0


def test_tuning_with_refine_counts_an_equal_duplicate_as_found() -> None:
    """Every row twice (rows 2i and 2i + 1 equal): which of a pair the exact top k kept does not move the tuned
    recall, while recall by ids does."""
    rng = np.random.default_rng(9)
    vectors = np.repeat(unit(rng.standard_normal((500, 16))), 2, axis=0)
    queries = unit(rng.standard_normal((20, 16)))
    scores, exact = exact_top_k(vectors, queries, 5)
    other = exact ^ 1  # the other row of each pair: the same scores
    index = build(vectors, "Flat")
    by_ids = [tune_search_params(index, queries, ids, k=5, refine=vectors, candidates=20) for ids in (exact, other)]
    # the 5th is one row of a pair (top 5 of pairs), and each list keeps another: the found one matches one list
    assert min(out["recall"] for out in by_ids) == 0.8
    for ids in (exact, other):
        tied = tune_search_params(index, queries, ids, k=5, refine=vectors, candidates=20, exact_top_scores=scores)
        assert tied["recall"] == 1.0


def test_tuning_works_on_an_unwrapped_ivf_index(data: tuple[np.ndarray, ...]) -> None:
    vectors, queries, exact = data
    index = build(vectors, "IVF64,Flat", wrap=False)
    out = tune_search_params(index, queries, exact, target_recall=0.9)
    assert out["reached"]
    assert out["recall"] >= 0.9
    assert index.nprobe == out["value"]


def test_tuning_hnsw_sets_ef_search(data: tuple[np.ndarray, ...]) -> None:
    vectors, queries, _exact = data
    index = build(vectors[:3_000], "HNSW16")
    _, exact5k = exact_top_k(vectors[:3_000], queries, 10)
    assert search_param_range(index)[0] == "efSearch"
    out = tune_search_params(index, queries, exact5k, target_recall=0.95, max_value=512)
    assert out["param"] == "efSearch"
    assert out["reached"]
    assert out["recall"] >= 0.95
    inner: Any = faiss.downcast_index(index.index)
    assert inner.hnsw.efSearch == out["value"]


def test_tuning_an_exact_index_reports_full_recall(data: tuple[np.ndarray, ...]) -> None:
    vectors, queries, exact = data
    out = tune_search_params(build(vectors, "Flat"), queries, exact)
    assert out["param"] is None
    assert out["value"] is None
    assert out["recall"] == pytest.approx(1.0)


def test_an_unreachable_target_reports_the_largest_value_tried(data: tuple[np.ndarray, ...], ivf: Any) -> None:
    _, queries, exact = data
    out = tune_search_params(ivf, queries, exact, target_recall=1.0, max_value=3)
    assert not out["reached"]
    assert out["value"] == 3
    assert set(out["evaluated"]) == {1, 2, 3}


def test_auto_tune_samples_queries_and_tunes_for_the_search_path(data: tuple[np.ndarray, ...], ivf: Any) -> None:
    vectors = data[0]
    choice = IndexChoice("IVF512,SQ8", True, 2, 48, 0, 20_000, "nprobe", "test")
    out = auto_tune(ivf, vectors, choice, k=10, candidates=50, n_queries=200)
    assert out["reached"]
    assert out["candidates"] == 100
    assert out["recall"] >= 0.95


def test_file_rows_reads_like_the_memmap(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from matching.vectors.autoindex import FileRows, file_rows

    data = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    path = tmp_path / "v.f32"
    data.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(50, 8))
    rows = file_rows(mm)
    assert isinstance(rows, FileRows)
    assert len(rows) == 50
    assert rows.shape == (50, 8)
    np.testing.assert_array_equal(rows[10:20], data[10:20])
    np.testing.assert_array_equal(rows[np.array([3, 49, 0, 3])], data[[3, 49, 0, 3]])
    picked = np.array([7, 8, 9, -1, 8, 30, 31, 2, -50])  # runs, repeats, negatives counted from the end
    np.testing.assert_array_equal(rows[picked], data[picked])
    assert rows[np.zeros(0, dtype=np.int64)].shape == (0, 8)
    for outside in (50, -51):
        with pytest.raises(IndexError, match=r"rows of .* are 0 to 49"):
            rows[np.array([1, outside])]
    block = rows[40:60]  # clipped to the rows there are, as a slice is; an array of its own, writable
    np.testing.assert_array_equal(block, data[40:])
    assert block.flags.owndata
    assert block.flags.writeable
    assert rows[5:5].shape == (0, 8)
    assert file_rows(data) is data
    with path.open("r+b") as fh:  # cut short under the reader: the file is damaged, not silently short
        fh.truncate(45 * 8 * 4)
    with pytest.raises(BundleError, match="ends before row 50"):
        rows[40:50]
    with pytest.raises(BundleError, match="ends before row 47"):  # a picked row past the end: the same error
        rows[np.array([2, 46, 3])]
