"""The SQLite store (row order, title lookups, files) and the MLP reranker (cosine start, persistence)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_catalogue
from safetensors.torch import load_file, save_file
from sqlalchemy.exc import IntegrityError

from matching.config import ScorerConfig
from matching.errors import BundleError
from matching.layout import SCORER_CONFIG, VECTORS_FILE
from matching.layout import SCORER_WEIGHTS as WEIGHTS_FILE
from matching.layout import STORE_DB as DB_FILE
from matching.scorer import Scorer
from matching.store import Store
from matching.types import IdType

# -- Store -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalogue() -> pd.DataFrame:
    return make_catalogue()


def test_rows_are_stored_in_catalogue_order(built_bundle: Any, catalogue: pd.DataFrame) -> None:
    store = built_bundle.store
    assert store.count == len(catalogue)
    assert store.id_type is IdType.INT
    rows = store.get(range(store.count))
    assert [r.row_id for r in rows] == list(range(len(catalogue)))
    assert [r.external_id for r in rows] == [str(i) for i in catalogue["id"]]
    assert [r.title for r in rows] == catalogue["title"].tolist()
    assert rows[3].metadata == {"brand": catalogue["brand"][3], "price": catalogue["price"][3]}


@pytest.mark.parametrize(
    "row_ids",
    [[5, 1, 30], [7, 7, 2, 7], [39], [], [0, 39, 0]],
    ids=["shuffled", "repeats", "single", "empty", "ends-and-repeat"],
)
def test_get_preserves_requested_order(built_bundle: Any, catalogue: pd.DataFrame, row_ids: list[int]) -> None:
    rows = built_bundle.store.get(row_ids)
    assert [r.row_id for r in rows] == row_ids
    assert [r.title for r in rows] == [catalogue["title"][i] for i in row_ids]


def test_get_accepts_numpy_ids(built_bundle: Any) -> None:
    rows = built_bundle.store.get(np.array([2, 1], dtype=np.int64))
    assert [r.row_id for r in rows] == [2, 1]


def test_get_of_an_absent_row_is_a_key_error(built_bundle: Any) -> None:
    with pytest.raises(KeyError):
        built_bundle.store.get([0, 10_000])


def test_find_titles(built_bundle: Any, catalogue: pd.DataFrame) -> None:
    titles = catalogue["title"].tolist()
    query = [titles[4], "no such product", titles[0], titles[4], titles[0].lower(), ""]
    assert built_bundle.store.find_titles(query) == [4, None, 0, 4, None, None]


def test_find_titles_of_nothing(built_bundle: Any) -> None:
    assert built_bundle.store.find_titles([]) == []


def test_external_id_uses_the_catalogue_id_type(built_bundle: Any) -> None:
    assert built_bundle.store.external_id("1007") == 1007


def _write_store(directory: Path, rows: list[tuple[str, str]], vectors: np.ndarray, id_type: IdType) -> None:
    writer = Store.create(directory, vectors.shape[1])
    ids = writer.append([r[0] for r in rows], [r[1] for r in rows], ["{}"] * len(rows), vectors)
    np.testing.assert_array_equal(ids, np.arange(len(rows)))
    writer.finish(id_type)


def test_writer_round_trip_in_several_appends(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5, 4)).astype(np.float32)
    writer = Store.create(tmp_path, 4)
    first = writer.append(["a", "b"], ["one", "two"], ['{"x": 1}', "{}"], vectors[:2])
    second = writer.append(["c", "d", "e"], ["three", "four", "five"], ["{}"] * 3, vectors[2:])
    writer.finish(IdType.STR)
    np.testing.assert_array_equal(first, [0, 1])
    np.testing.assert_array_equal(second, [2, 3, 4])
    store = Store.open(tmp_path)
    try:
        assert store.count == 5
        np.testing.assert_array_equal(np.asarray(store.vectors), vectors)
        assert store.external_id("c") == "c"
        assert [r.title for r in store.get([4, 0])] == ["five", "one"]
        assert store.get([0])[0].metadata == {"x": 1}
    finally:
        store.close()


def test_the_writer_indexes_ids_and_title_hashes_once_the_rows_are_in(tmp_path: Path) -> None:
    """The store's indexes are created by ``finish`` (faster than kept up row by row), and they hold: a lookup by
    id or title hash uses them, and an id written twice fails there, as it failed on insert before."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    writer = Store.create(tmp_path / "a", 4)
    writer.append(["a", "b"], ["one", "two"], ["{}", "{}"], np.zeros((2, 4), dtype=np.float32))
    db = tmp_path / "a" / DB_FILE
    with sqlite3.connect(db) as conn:  # before finish: the table alone
        assert conn.execute("PRAGMA index_list(titles)").fetchall() == []
    writer.finish(IdType.STR)
    with sqlite3.connect(db) as conn:
        indexes = {row[1]: row[2] for row in conn.execute("PRAGMA index_list(titles)")}
        assert indexes == {"ix_titles_external_id": 1, "ix_titles_title_hash": 0}  # name: unique
        plan = " ".join(str(r) for r in conn.execute("EXPLAIN QUERY PLAN SELECT * FROM titles WHERE external_id='b'"))
        assert "ix_titles_external_id" in plan
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute("INSERT INTO titles VALUES (2, 'a', 'three', 0, '{}')")
    writer = Store.create(tmp_path / "b", 4)
    writer.append(["a", "a"], ["one", "two"], ["{}", "{}"], np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(IntegrityError, match="UNIQUE"):
        writer.finish(IdType.STR)
    writer.abort()


def test_an_empty_append_adds_nothing(tmp_path: Path) -> None:
    """A part with no rows (a Ray batch that only carried a count of skipped rows) is taken, and adds nothing."""
    writer = Store.create(tmp_path, 4)
    writer.append(["a"], ["one"], ["{}"], np.ones((1, 4), dtype=np.float32))
    assert len(writer.append([], [], [], np.zeros((0, 4), dtype=np.float32))) == 0
    writer.append(["b"], ["two"], ["{}"], np.ones((1, 4), dtype=np.float32))
    writer.finish(IdType.STR)
    store = Store.open(tmp_path)
    try:
        assert store.count == 2
        assert [r.external_id for r in store.get([0, 1])] == ["a", "b"]
    finally:
        store.close()


def test_writer_rejects_vectors_of_the_wrong_shape(tmp_path: Path) -> None:
    writer = Store.create(tmp_path, 4)
    with pytest.raises(ValueError, match="shape"):
        writer.append(["a"], ["one"], ["{}"], np.zeros((1, 3), dtype=np.float32))
    writer.abort()


def test_writer_refuses_an_existing_store(tmp_path: Path) -> None:
    _write_store(tmp_path, [("a", "one")], np.zeros((1, 4), dtype=np.float32), IdType.STR)
    with pytest.raises(BundleError, match="already exists"):
        Store.create(tmp_path, 4)


@pytest.mark.parametrize("name", ["store.json", DB_FILE, VECTORS_FILE])
def test_open_with_a_missing_file_is_a_bundle_error(tmp_path: Path, name: str) -> None:
    _write_store(tmp_path, [("a", "one")], np.zeros((1, 4), dtype=np.float32), IdType.STR)
    (tmp_path / name).unlink()
    with pytest.raises(BundleError, match=name):
        Store.open(tmp_path)


def test_open_with_a_truncated_vector_file_is_a_bundle_error(tmp_path: Path) -> None:
    _write_store(tmp_path, [("a", "one"), ("b", "two")], np.ones((2, 4), dtype=np.float32), IdType.STR)
    path = tmp_path / VECTORS_FILE
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(BundleError, match="28 bytes, expected 32"):
        Store.open(tmp_path)


# -- Scorer ------------------------------------------------------------------------------------------


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def pairs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return unit_rows(rng, 1, 8), unit_rows(rng, 25, 8)


def perturbed_scorer(seed: int = 0) -> Scorer:
    torch.manual_seed(seed)
    scorer = Scorer(ScorerConfig(dim=8, hidden=16))
    with torch.no_grad():
        for p in scorer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return scorer


def test_untrained_scorer_scores_equal_the_cosine(pairs: tuple[np.ndarray, np.ndarray]) -> None:
    q, t = pairs
    scores = Scorer(ScorerConfig(dim=8, hidden=16)).score(q, t)
    cosine = (t @ q[0]).astype(np.float64)
    assert np.diff(np.sort(cosine)).min() > 1e-5  # no near-ties, so the two rankings must agree exactly
    assert scores.dtype == np.float32
    assert scores.shape == (25,)
    np.testing.assert_allclose(scores, cosine, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.argsort(-scores, kind="stable"), np.argsort(-cosine, kind="stable"))


def test_untrained_scorer_scores_row_pairs(pairs: tuple[np.ndarray, np.ndarray]) -> None:
    _, t = pairs
    q = np.roll(t, 1, axis=0)
    scores = Scorer(ScorerConfig(dim=8)).score(q, t)
    np.testing.assert_allclose(scores, (q * t).sum(axis=1), atol=1e-6, rtol=0)


def test_perturbed_scorer_moves_away_from_the_cosine(pairs: tuple[np.ndarray, np.ndarray]) -> None:
    q, t = pairs
    scores = perturbed_scorer().score(q, t)
    assert np.abs(scores - t @ q[0]).max() > 1e-3


def test_score_is_deterministic_even_in_training_mode(pairs: tuple[np.ndarray, np.ndarray]) -> None:
    q, t = pairs
    scorer = perturbed_scorer()
    scorer.train()
    first = scorer.score(q, t)
    np.testing.assert_array_equal(scorer.score(q, t), first)  # dropout is off while scoring
    assert scorer.training  # and the mode is restored


def test_save_load_round_trip_gives_identical_scores(pairs: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    q, t = pairs
    scorer = perturbed_scorer(seed=3)
    scorer.save(tmp_path)
    assert (tmp_path / WEIGHTS_FILE).is_file()
    assert ScorerConfig.load(tmp_path / SCORER_CONFIG) == scorer.config
    loaded = Scorer.load(tmp_path)
    assert not loaded.training
    np.testing.assert_array_equal(loaded.score(q, t), scorer.score(q, t))


def test_load_with_an_extra_weight_is_a_bundle_error(tmp_path: Path) -> None:
    Scorer(ScorerConfig(dim=8, hidden=16)).save(tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(BundleError, match=r"extra\.weight"):
        Scorer.load(tmp_path)


def test_load_with_a_missing_weight_is_a_bundle_error(tmp_path: Path) -> None:
    Scorer(ScorerConfig(dim=8, hidden=16)).save(tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    del state["mlp.0.bias"]
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(BundleError, match=r"mlp\.0\.bias"):
        Scorer.load(tmp_path)


def test_load_with_a_config_of_another_shape_is_a_bundle_error(tmp_path: Path) -> None:
    Scorer(ScorerConfig(dim=8, hidden=16)).save(tmp_path)
    ScorerConfig(dim=8, hidden=32).save(tmp_path / SCORER_CONFIG)
    with pytest.raises(BundleError, match="cannot load the scorer"):
        Scorer.load(tmp_path)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, SCORER_CONFIG])
def test_load_with_a_missing_file_is_a_bundle_error(tmp_path: Path, name: str) -> None:
    Scorer(ScorerConfig(dim=8, hidden=16)).save(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(BundleError, match=name):
        Scorer.load(tmp_path)
