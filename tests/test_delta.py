"""Changes kept as a delta (matching.delta): what a change writes, and answers equal to a bundle written whole."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from matching import Matcher, delta
from matching.bundle import current_generation, read_manifest
from matching.errors import BundleError
from matching.layout import (
    FIELDS_ARRAYS,
    INDEX_FILE,
    LEXICAL_ARRAYS,
    STORE_CONFIG,
    STORE_DB,
    STORE_DELTA,
    VECTORS_FILE,
)
from tests.conftest import assert_same_ranking, make_catalogue
from tests.test_changes import NEW

QUERIES = ["black yoga mat", "red tent", "Hooli espresso", "silver kettle", "acme"]
WHERES: list[dict[str, Any] | None] = [None, {"brand": "Hooli"}, {"price": ("<", 60)}, {"brand": {"in": ["Acme"]}}]


@pytest.fixture
def hybrid(tmp_path: Path, tiny_encoder: Any) -> Any:
    """A fresh, writable product bundle with BM25 (hybrid retrieval)."""
    with Matcher.build(make_catalogue(), tmp_path / "products", encoder=tiny_encoder, show_progress=False) as m:
        yield m


@pytest.fixture
def fold_at_3(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fold limit of 3 rows, whatever the catalogue's size."""
    monkeypatch.setattr(delta, "FOLD_ROWS", 3)
    monkeypatch.setattr(delta, "FOLD_SHARE", 0.0)


def _path(m: Matcher) -> Path:
    assert m.path is not None
    return m.path


def _inode(path: Path) -> int:
    return os.stat(path).st_ino


def _answers(m: Matcher, retrieval: str, where: dict[str, Any] | None) -> list[tuple[list[Any], list[float]]]:
    hits = m.search_batch(QUERIES, k=len(m), rerank=False, retrieval=retrieval, where=where)
    return [([h.id for h in q], [h.score for h in q]) for q in hits]


def assert_as_written_whole(m: Matcher, tmp_path: Path, name: str = "whole") -> None:
    """``m`` answers every query, retrieval and filter as a bundle written whole from its live rows does (a copy:
    same stored vectors, new store, index and BM25 postings), scores to 1e-5."""
    with m.copy(tmp_path / name, show_progress=False) as whole:
        assert not (current_generation(tmp_path / name) / STORE_DELTA).exists()
        assert sorted(map(str, m.store.frame()["id"])) == sorted(map(str, whole.store.frame()["id"]))
        for retrieval in ("dense", "lexical", "hybrid"):
            for where in WHERES:
                for (ids_a, sa), (ids_b, sb) in zip(
                    _answers(m, retrieval, where), _answers(whole, retrieval, where), strict=True
                ):
                    assert_same_ranking(ids_a, sa, ids_b, sb, atol=1e-5)


def test_a_one_title_change_writes_the_delta_and_carries_every_base_file(hybrid: Matcher) -> None:
    path = _path(hybrid)
    base = current_generation(path)
    carried = (STORE_DB, INDEX_FILE, LEXICAL_ARRAYS, FIELDS_ARRAYS, VECTORS_FILE)
    inodes = {name: _inode(base / name) for name in carried}
    hybrid.add(NEW.iloc[:1], show_progress=False)
    gen = current_generation(path)
    assert gen != base
    assert {name: _inode(gen / name) for name in carried} == inodes  # hard links: not rewritten
    assert (gen / STORE_DELTA).is_file()
    manifest = read_manifest(gen, verify=True)
    assert STORE_DELTA in manifest.files
    config = (gen / STORE_CONFIG).read_text()
    assert '"base_rows": 40' in config
    assert '"base_count": 40' in config
    assert len(hybrid) == 41
    assert hybrid.search("silver espresso machine", k=1, rerank=False)[0].id == 5001


def test_every_kind_of_change_answers_as_a_bundle_written_whole(
    hybrid: Matcher, tiny_encoder: Any, tmp_path: Path
) -> None:
    catalogue = make_catalogue()
    hybrid.add(NEW, show_progress=False)
    hybrid.remove([5001, catalogue["id"][0]])  # a row of the delta, and one of the base
    meta = catalogue.iloc[[3]].assign(price=1.5)  # the base row's metadata alone
    hybrid.upsert(meta, show_progress=False)
    hybrid.upsert(meta.assign(price=2.5), show_progress=False)  # again: the delta's copy is updated
    hybrid.upsert(catalogue.iloc[[4]].assign(title="Acme folding camping chair"), show_progress=False)
    hybrid.upsert(NEW.iloc[[1]].assign(brand="Initech"), show_progress=False)  # a delta row's metadata
    hybrid.remove([catalogue["id"][5]])
    gen = current_generation(hybrid.path)  # type: ignore[arg-type]
    assert (gen / STORE_DELTA).is_file()
    assert len(hybrid) == 40 + 3 - 2 - 1
    rows = {r["id"]: r for r in hybrid.store.frame().to_dict("records")}
    assert rows[catalogue["id"][3]]["price"] == 2.5
    assert rows[5002]["brand"] == "Initech"
    assert rows[catalogue["id"][4]]["title"] == "Acme folding camping chair"
    assert catalogue["id"][0] not in rows
    assert 5001 not in rows
    assert_as_written_whole(hybrid, tmp_path)
    # loaded again from disk alone (checksums verified): the same answers
    with Matcher.load(hybrid.path, encoder=tiny_encoder) as again:  # type: ignore[arg-type]
        for retrieval in ("dense", "lexical", "hybrid"):
            for where in WHERES:
                assert _answers(again, retrieval, where) == _answers(hybrid, retrieval, where)
        assert (
            again.store.filter_ids({"price": ("<", 3)}).tolist()
            == hybrid.store.filter_ids({"price": ("<", 3)}).tolist()
        )


def test_filters_over_a_delta_equal_sql_over_its_rows(hybrid: Matcher) -> None:
    hybrid.add(NEW, show_progress=False)
    hybrid.upsert(make_catalogue().iloc[[2]].assign(brand="Hooli"), show_progress=False)
    store = hybrid.store
    assert store.fields is not None
    assert store.fields.rows == len(store.vectors)
    for where in ({"brand": "Hooli"}, {"price": (">", 50)}, {"brand": {"in": ["Hooli", "Vandelay"]}}):
        np.testing.assert_array_equal(store.filter_ids(where), store.sql_filter_ids(where))
    assert len(store.filter_ids({"brand": "Hooli"})) == 3


def test_a_delta_past_its_limit_is_folded_into_new_base_files(hybrid: Matcher, tmp_path: Path, fold_at_3: None) -> None:
    path = _path(hybrid)
    hybrid.add(NEW.iloc[:2], show_progress=False)
    hybrid.remove([make_catalogue()["id"][7]])  # 3 rows: the next change folds
    assert (current_generation(path) / STORE_DELTA).is_file()
    before = _inode(current_generation(path) / STORE_DB)
    hybrid.add(NEW.iloc[2:], show_progress=False)
    gen = current_generation(path)
    assert not (gen / STORE_DELTA).exists()
    assert '"base_rows"' not in (gen / STORE_CONFIG).read_text()
    assert _inode(gen / STORE_DB) != before
    assert len(hybrid) == 42
    assert_as_written_whole(hybrid, tmp_path)
    hybrid.remove([5003])  # a new delta over the folded files
    assert (current_generation(path) / STORE_DELTA).is_file()
    assert_as_written_whole(hybrid, tmp_path, "again")


def test_compaction_writes_the_delta_into_new_base_files(hybrid: Matcher, tmp_path: Path) -> None:
    hybrid.add(NEW, show_progress=False)
    hybrid.remove([5002, make_catalogue()["id"][1]])
    hybrid.compact(show_progress=False)
    gen = current_generation(hybrid.path)  # type: ignore[arg-type]
    assert not (gen / STORE_DELTA).exists()
    assert len(hybrid) == 41
    assert_as_written_whole(hybrid, tmp_path)


def test_a_reader_pinned_before_a_change_keeps_its_answers(hybrid: Matcher, tiny_encoder: Any) -> None:
    with Matcher.load(hybrid.path, encoder=tiny_encoder) as reader:  # type: ignore[arg-type]
        before = _answers(reader, "hybrid", None)
        hybrid.add(NEW, show_progress=False)
        hybrid.remove([make_catalogue()["id"][2]])
        assert _answers(reader, "hybrid", None) == before
        assert len(reader) == 40


def test_a_bulk_change_past_the_limit_is_folded_in_the_same_call(
    hybrid: Matcher, tmp_path: Path, fold_at_3: None
) -> None:
    path = _path(hybrid)
    bulk = make_catalogue().assign(id=lambda f: f["id"] + 9000, title=lambda f: f["title"] + " refill")
    report = hybrid.add(bulk.iloc[:30], show_progress=False)
    gen = current_generation(path)
    assert report.generation == gen.name
    assert report.folded
    assert not (gen / STORE_DELTA).exists()  # readers do not replay 30 rows past a limit of 3
    assert len(hybrid) == 70
    assert_as_written_whole(hybrid, tmp_path)


def test_an_index_that_cannot_remove_rows_takes_whole_file_changes(tmp_path: Path, tiny_encoder: Any) -> None:
    from matching import IndexConfig

    catalogue = make_catalogue()
    config = IndexConfig(factory="HNSW8")
    with Matcher.build(catalogue, tmp_path / "b", encoder=tiny_encoder, index_config=config, show_progress=False) as m:
        m.add(NEW, show_progress=False)
        m.remove([5001, catalogue["id"][0]])
        assert not (current_generation(tmp_path / "b") / STORE_DELTA).exists()
        assert len(m) == 41
    with Matcher.load(tmp_path / "b", encoder=tiny_encoder) as again:
        assert again.search("Hooli black yoga mat", k=1, rerank=False)[0].id == 5002


def test_a_generation_with_a_delta_is_refused_by_a_reader_of_format_2(
    hybrid: Matcher, tiny_encoder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _path(hybrid)
    built = read_manifest(current_generation(path))
    assert (built.format_version, built.block_bytes) == (3, 4 << 20)  # a new file's blocks: 4 MiB (format 3)
    hybrid.add(NEW.iloc[:1], show_progress=False)
    assert read_manifest(current_generation(path)).format_version == 3
    monkeypatch.setattr("matching.bundle.FORMAT_VERSION", 2)  # what the library before the delta reads
    with pytest.raises(BundleError, match="newer than this library reads"):
        Matcher.load(path, encoder=tiny_encoder)


def test_a_damaged_delta_is_refused_before_it_is_read(hybrid: Matcher) -> None:
    path = _path(hybrid)
    hybrid.add(NEW.iloc[:1], show_progress=False)
    live = current_generation(path)
    (live / STORE_DELTA).write_bytes(b"not a database" + (live / STORE_DELTA).read_bytes()[14:])
    with pytest.raises(BundleError, match=r"delta\.sqlite.*damaged"):
        hybrid.remove([5001])
    assert current_generation(path) == live


def test_a_base_title_that_no_longer_matches_its_hash_is_not_copied_into_the_delta(hybrid: Matcher) -> None:
    path = _path(hybrid)
    live = current_generation(path)
    catalogue = make_catalogue()
    conn = sqlite3.connect(live / STORE_DB)  # damage SQLite cannot see: a title's text, its hash kept
    with conn:
        conn.execute("UPDATE titles SET title = 'tampered' WHERE external_id = ?", (str(catalogue["id"][3]),))
    conn.close()
    # the same title with new metadata: the delta would take a copy of the stored row (a new title replaces it)
    with pytest.raises(BundleError, match=r"store\.sqlite.*title does not match its hash"):
        hybrid.upsert(catalogue.iloc[[3]].assign(title="tampered", price=1.5), show_progress=False)
    assert current_generation(path) == live


def test_a_bundle_with_a_delta_is_reencoded_from_its_live_rows(
    hybrid: Matcher, tiny_encoder: Any, tmp_path: Path
) -> None:
    catalogue = make_catalogue()
    hybrid.add(NEW, show_progress=False)
    hybrid.remove([catalogue["id"][0]])
    hybrid.upsert(catalogue.iloc[[3]].assign(price=2.5), show_progress=False)
    before = {h: _answers(hybrid, "hybrid", w) for h, w in enumerate(WHERES)}
    hybrid.reencode(encoder=tiny_encoder, show_progress=False)  # the same encoder: the same vectors again
    assert not (current_generation(hybrid.path) / STORE_DELTA).exists()  # type: ignore[arg-type]
    assert len(hybrid) == 42
    for h, where in enumerate(WHERES):
        for (ids_a, sa), (ids_b, sb) in zip(before[h], _answers(hybrid, "hybrid", where), strict=True):
            assert_same_ranking(ids_a, sa, ids_b, sb, atol=1e-5)
    assert_as_written_whole(hybrid, tmp_path)


def test_a_fold_that_fails_leaves_the_change_published_and_the_next_change_writes_whole_files(
    hybrid: Matcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fold_at_3: None
) -> None:
    from matching import changes

    path = _path(hybrid)

    def full_disk(live: Path, staging: Path) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(changes, "StoreEditor", full_disk)
        report = hybrid.add(NEW, show_progress=False)  # 3 rows: within the limit
        assert not report.folded
        report = hybrid.remove([make_catalogue()["id"][0]])  # 4: past it, and the fold fails
    assert report.published
    assert not report.folded
    assert report.generation == current_generation(path).name == hybrid.generation
    assert (current_generation(path) / STORE_DELTA).is_file()
    assert len(hybrid) == 42
    report = hybrid.remove([5001])  # the delta is past its limit: this change writes whole files
    assert not (current_generation(path) / STORE_DELTA).exists()
    assert len(hybrid) == 41
    assert_as_written_whole(hybrid, tmp_path)
