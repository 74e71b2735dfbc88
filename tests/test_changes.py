"""Catalogue changes (add / upsert / remove / compact), metadata filters, writer lock and reader leases."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from matching import IndexConfig, Matcher
from matching.bundle import collect_garbage, current_generation, read_manifest, writer_lock
from matching.cli import main
from matching.errors import (
    BadRowError,
    BundleError,
    BundleLockedError,
    ConfigError,
    DuplicateIdError,
    SchemaError,
)
from matching.layout import VECTORS_FILE
from matching.store import parse_where
from tests.conftest import build_products, hidden_entries, make_catalogue

NEW = pd.DataFrame(
    {
        "id": [5001, 5002, 5003],
        "title": ["Hooli silver espresso machine", "Hooli black yoga mat", "Vandelay red camping tent"],
        "brand": ["Hooli", "Hooli", "Vandelay"],
        "price": [199.0, 25.5, 89.99],
    }
)
QUERY = "black yoga mat"


def catalogue_of(m: Matcher) -> dict[Any, tuple[str, dict[str, Any]]]:
    """Every live row: id -> (title, metadata)."""
    out = {}
    for rows in m.store.rows():
        for r in rows:
            out[m.store.external_id(r.external_id)] = (r.title, r.metadata)
    return out


def all_hits(m: Matcher, query: str = QUERY) -> list[tuple[Any, float]]:
    return [(h.id, round(h.score, 5)) for h in m.search(query, k=len(m), rerank=False)]


def fresh_build(df: pd.DataFrame, path: Path, encoder: Any, **kwargs: Any) -> Matcher:
    return Matcher.build(df, path, encoder=encoder, show_progress=False, **{"retrieval": "dense", **kwargs})


# -- add ------------------------------------------------------------------------------------------------


def test_add_encodes_only_new_titles_and_equals_a_full_rebuild(own_bundle: Matcher, tiny_encoder: Any, tmp_path: Path):
    path = own_bundle.path
    assert path is not None
    before_gen = current_generation(path)
    old_vectors = (before_gen / VECTORS_FILE).read_bytes()
    report = own_bundle.add(NEW, show_progress=False)
    assert (report.added, report.encoded, report.count) == (3, 3, 43)
    assert len(own_bundle) == 43
    assert own_bundle.index.ntotal == 43
    assert own_bundle.generation == current_generation(path).name != before_gen.name
    # titles already cached were not re-encoded: the vector file starts with the old bytes
    assert (current_generation(path) / VECTORS_FILE).read_bytes()[: len(old_vectors)] == old_vectors
    union = pd.concat([make_catalogue(), NEW], ignore_index=True)
    with fresh_build(union, tmp_path / "rebuilt", tiny_encoder) as rebuilt:
        assert catalogue_of(own_bundle) == catalogue_of(rebuilt)
        assert all_hits(own_bundle) == all_hits(rebuilt)
    with Matcher.load(path, encoder=tiny_encoder) as reloaded:  # checksums verified
        assert all_hits(reloaded) == all_hits(own_bundle)
        assert reloaded.search(QUERY, k=1)[0].id == 5002


def test_add_uses_the_columns_the_bundle_was_built_with(tmp_path: Path, tiny_encoder: Any) -> None:
    df = make_catalogue().rename(columns={"id": "sku", "title": "name"})
    with Matcher.build(
        df, tmp_path / "b", encoder=tiny_encoder, id_column="sku", title_column="name", show_progress=False
    ) as m:
        m.add(NEW.rename(columns={"id": "sku", "title": "name"}), show_progress=False)
        assert m.search(QUERY, k=1)[0].id == 5002


def test_add_from_a_csv_file(own_bundle: Matcher, tmp_path: Path) -> None:
    source = tmp_path / "new.csv"
    NEW.to_csv(source, index=False)
    own_bundle.add(source, show_progress=False)
    assert catalogue_of(own_bundle)[5003] == ("Vandelay red camping tent", {"brand": "Vandelay", "price": 89.99})


def test_adding_an_existing_id_changes_nothing(own_bundle: Matcher) -> None:
    path = own_bundle.path
    assert path is not None
    gen = current_generation(path).name
    clash = pd.concat([NEW, pd.DataFrame({"id": [1007], "title": ["a clash"], "brand": ["x"], "price": [1.0]})])
    with pytest.raises(DuplicateIdError, match=r"row 4: id '1007' is already in the bundle; use upsert"):
        own_bundle.add(clash, show_progress=False)
    assert current_generation(path).name == gen == own_bundle.generation
    assert len(own_bundle) == 40
    assert hidden_entries(path) == []


def test_string_ids_cannot_join_an_integer_id_bundle(own_bundle: Matcher) -> None:
    with pytest.raises(SchemaError, match=r"row 2: id 'abc' is not an integer"):
        own_bundle.add(pd.DataFrame({"id": [9000, "abc"], "title": ["one", "two"]}), show_progress=False)
    assert len(own_bundle) == 40


def test_an_empty_change_is_refused(own_bundle: Matcher) -> None:
    with pytest.raises(BadRowError, match="no usable rows"):
        own_bundle.add(pd.DataFrame({"id": [], "title": []}), show_progress=False)


def test_titles_from_another_encoder_are_refused(own_bundle: Matcher, other_model_dir: Path) -> None:
    path = own_bundle.path
    assert path is not None
    with Matcher.load(path, model=other_model_dir, allow_encoder_mismatch=True) as other:
        with pytest.raises(BundleError, match="built with another encoder"):
            other.add(NEW, show_progress=False)
        report = other.add(NEW, show_progress=False, allow_encoder_mismatch=True)
        assert report.added == 3


# -- upsert ---------------------------------------------------------------------------------------------


def test_upsert_reencodes_changed_titles_only(own_bundle: Matcher, tiny_encoder: Any, tmp_path: Path) -> None:
    df = make_catalogue()
    changes = df.iloc[[0, 1, 2]].copy()
    changes.loc[changes.index[0], "title"] = "Acme black yoga mat"  # new title
    changes.loc[changes.index[1], "price"] = 1.25  # metadata only
    # changes.iloc[2] is identical
    upserts = pd.concat([changes, NEW.iloc[[0]]], ignore_index=True)
    report = own_bundle.upsert(upserts, show_progress=False)
    assert (report.added, report.updated, report.metadata_updated, report.unchanged) == (1, 1, 1, 1)
    assert report.encoded == 2
    assert report.count == 41
    expected = pd.concat([df, NEW.iloc[[0]]], ignore_index=True).set_index("id")
    expected.loc[1000, "title"] = "Acme black yoga mat"
    expected.loc[1007, "price"] = 1.25
    with fresh_build(expected.reset_index(), tmp_path / "rebuilt", tiny_encoder) as rebuilt:
        assert catalogue_of(own_bundle) == catalogue_of(rebuilt)
        assert all_hits(own_bundle) == all_hits(rebuilt)
    assert own_bundle.search("Acme black yoga mat", k=1)[0].id == 1000
    assert own_bundle.index.ntotal == len(own_bundle) == 41


def test_a_change_that_changes_nothing_publishes_nothing(
    own_bundle: Matcher, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = own_bundle.path
    assert path is not None
    live = current_generation(path).name
    entries = sorted(p.name for p in path.iterdir())
    report = own_bundle.upsert(make_catalogue(), show_progress=False)  # a client's retry: every row as stored
    assert (report.unchanged, report.added, report.updated, report.metadata_updated) == (40, 0, 0, 0)
    assert (report.published, report.generation, report.count, report.encoded) == (False, live, 40, 0)
    report = own_bundle.remove([42, "nope"], missing_ok=True)
    assert (report.published, report.generation, report.missing, report.count) == (False, live, 2, 40)
    csv = tmp_path / "same.csv"
    make_catalogue().to_csv(csv, index=False)
    capsys.readouterr()
    assert main(["upsert", str(path), str(csv), "-q"]) == 0
    assert capsys.readouterr().out == f"upsert {path}: unchanged 40; nothing to publish, {live} stays live\n"
    assert sorted(p.name for p in path.iterdir()) == entries  # no generation, no staging left behind
    changed = make_catalogue()
    changed.loc[39, "price"] = 0.5  # in the last chunk: the store is copied only when a row changes
    report = own_bundle.upsert(changed, chunksize=16, show_progress=False)
    assert (report.published, report.metadata_updated, report.unchanged) == (True, 1, 39)
    assert report.generation == "gen-000002" != live == "gen-000001"
    assert catalogue_of(own_bundle)[int(changed.loc[39, "id"])][1]["price"] == 0.5
    assert len(own_bundle) == 40


# -- remove and compact -------------------------------------------------------------------------------


def test_remove_then_compact(own_bundle: Matcher, tiny_encoder: Any, tmp_path: Path) -> None:
    path = own_bundle.path
    assert path is not None
    gone = [1000, 1007, 1014]
    report = own_bundle.remove(gone)
    assert (report.removed, report.count) == (3, 37)
    assert not {h.id for h in own_bundle.search(QUERY, k=40)} & set(gone)
    assert own_bundle.index.ntotal == len(own_bundle) == 37
    rest = make_catalogue()[lambda d: ~d["id"].isin(gone)]
    with fresh_build(rest, tmp_path / "rebuilt", tiny_encoder) as rebuilt:
        expected = all_hits(rebuilt)
    assert all_hits(own_bundle) == expected
    # the dead rows are still in the vector file until compaction
    assert own_bundle.store.vectors.shape[0] == 40
    compacted = own_bundle.compact(show_progress=False)
    assert compacted.count == 37
    assert own_bundle.store.vectors.shape[0] == 37
    assert (current_generation(path) / VECTORS_FILE).stat().st_size == 37 * 32 * 4
    assert all_hits(own_bundle) == expected
    with Matcher.load(path, encoder=tiny_encoder) as reloaded:
        assert all_hits(reloaded) == expected


def test_removing_unknown_ids(own_bundle: Matcher) -> None:
    with pytest.raises(BadRowError, match=r"1 id\(s\) to remove are not in the bundle, e\.g\. \['42'\]"):
        own_bundle.remove([1000, 42])
    assert len(own_bundle) == 40
    report = own_bundle.remove(["1000", 42], missing_ok=True)
    assert (report.removed, report.missing, len(own_bundle)) == (1, 1, 39)


def test_compact_can_change_the_index(own_bundle: Matcher) -> None:
    own_bundle.compact(index_config=IndexConfig(factory="IVF4,Flat", nprobe=4), show_progress=False)
    assert own_bundle.manifest.factory == "IVF4,Flat"
    flat = [h.id for h in own_bundle.search(QUERY, k=40, rerank=False)]
    assert len(flat) == 40


@pytest.mark.parametrize(("factory", "nprobe"), [("IVF4,Flat", 4), ("HNSW8", None)])
def test_changes_on_other_index_types(tmp_path: Path, tiny_encoder: Any, factory: str, nprobe: int | None) -> None:
    config = IndexConfig(factory=factory, nprobe=nprobe)
    with fresh_build(make_catalogue(), tmp_path / "b", tiny_encoder, index_config=config) as m:
        m.remove([1000, 1007])
        m.upsert(NEW, show_progress=False)
        assert m.index.ntotal == len(m) == 41
        ids = {h.id for h in m.search(QUERY, k=41, rerank=False, candidates=41)}
        assert 1000 not in ids
        assert 5002 in ids
        # every id the index returns exists in the store
        vectors = m.store.vectors[m.store.live_ids()]
        _, found = m.index.search(vectors, 1)
        assert set(found[:, 0].tolist()) <= set(m.store.live_ids().tolist())


# -- filters --------------------------------------------------------------------------------------------


def brute_force(m: Matcher, query: str, allowed: set[Any], k: int) -> list[Any]:
    q = m.query_encoder.encode_queries([query])[0]
    rows = [r for batch in m.store.rows() for r in batch if m.store.external_id(r.external_id) in allowed]
    sims = np.asarray(m.store.vectors[[r.row_id for r in rows]]) @ q
    order = np.argsort(-sims, kind="stable")[:k]
    return [m.store.external_id(rows[i].external_id) for i in order]


@pytest.mark.parametrize(
    ("where", "keep"),
    [
        ({"brand": "Acme"}, lambda r: r.brand == "Acme"),
        ({"price": ("<", 30)}, lambda r: r.price < 30),
        (
            {"brand": ["Globex", "Initech"], "price": (">=", 60)},
            lambda r: r.brand in ("Globex", "Initech") and r.price >= 60,
        ),
        ({"brand": ("not in", ["Acme", "Globex"])}, lambda r: r.brand not in ("Acme", "Globex")),
        ({"brand": ("!=", "Acme"), "price": ("<=", 40.74)}, lambda r: r.brand != "Acme" and r.price <= 40.74),
    ],
)
@pytest.mark.parametrize("exact_limit", [20_000, 0])
def test_filtered_search_returns_k_matching_hits(
    built_bundle: Matcher, where: dict[str, Any], keep: Any, exact_limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # exact_limit=0 forces the FAISS id-selector path instead of the exact subset search
    monkeypatch.setattr("matching.search.EXACT_FILTER_LIMIT", exact_limit)
    df = make_catalogue()
    allowed = set(df[[bool(keep(r)) for r in df.itertuples()]]["id"])
    assert allowed
    k = min(5, len(allowed))
    hits = built_bundle.search(QUERY, k=k, where=where, rerank=False)
    assert len(hits) == k
    assert {h.id for h in hits} <= allowed
    assert [h.id for h in hits] == brute_force(built_bundle, QUERY, allowed, k)


def test_a_selective_filter_on_an_approximate_index_still_returns_k(
    tmp_path: Path, tiny_encoder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("matching.search.EXACT_FILTER_LIMIT", 0)
    config = IndexConfig(factory="IVF8,Flat", nprobe=1)
    with fresh_build(make_catalogue(), tmp_path / "b", tiny_encoder, index_config=config) as m:
        allowed = set(make_catalogue().query("brand == 'Initech'")["id"])
        hits = m.search("red running shoes", k=8, where={"brand": "Initech"}, rerank=False)
        assert {h.id for h in hits} == allowed
        assert [h.id for h in hits] == brute_force(m, "red running shoes", allowed, 8)


def test_filters_bind_values_and_reject_bad_conditions(built_bundle: Matcher) -> None:
    assert built_bundle.search(QUERY, where={"brand": "x' OR 1=1 --"}) == []
    assert built_bundle.search(QUERY, where={"brand'); DROP TABLE titles; --": "Acme"}) == []
    assert len(built_bundle.search(QUERY, k=3, where={"brand": "Acme"})) == 3  # the table is still there
    assert built_bundle.search(QUERY, where={"colour": None}, k=50).__len__() == 40  # missing field is null
    for bad, message in [
        ({"price": ("~", 3)}, "not an .operator, value. pair"),
        ({"price": ("<", [1])}, "is not a string, number, bool or None"),
        ({1: 1}, "1 is not a metadata field name"),
        ({"brand": ("in", "Acme")}, "needs a list"),
        ({"price": ("<", None)}, "None can only be compared"),
    ]:
        with pytest.raises(ConfigError, match=message):
            built_bundle.search(QUERY, where=bad)


def test_a_list_of_mixed_types_matches_each_value_as_itself(built_bundle: Matcher) -> None:
    # [4.99, ""] was bound as floats and the empty string failed to convert: a 500 through the service
    first = built_bundle.search(QUERY, k=50, where={"price": [4.99, ""]})
    assert [m.metadata["price"] for m in first] == [4.99]
    both = built_bundle.search(QUERY, k=50, where={"price": ("in", ["", 4.99, "Acme", 8.24, None])})
    assert sorted(m.metadata["price"] for m in both) == [4.99, 8.24]
    others = built_bundle.search(QUERY, k=50, where={"brand": ("not in", [0.0, "Acme"])})
    assert len(others) == 40 - 8
    assert all(m.metadata["brand"] != "Acme" for m in others)


def test_a_where_too_deep_or_too_big_for_sqlite_is_refused_by_name(built_bundle: Matcher) -> None:
    deep: list[Any] = []
    for _ in range(100_000):  # deeper than repr can print
        deep = [deep]
    for bad, message in [
        ({"price": ("<", deep)}, "a list of 1 is not a string, number, bool or None"),
        ({"price": {"in": [deep]}}, "a list of 1 is not a string, number, bool or None"),
        ({f"f{i}": i for i in range(257)}, "more than 256 conditions"),  # SQLite nests ANDs at most 1,000 deep
        ({"price": {"in": list(range(10_001))}}, "more than 10000 values"),
        ({"brand": "\ud800"}, "not valid Unicode"),
        ({"price": 10**5000}, "an integer of 16610 bits is outside SQLite's 64-bit integers"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            built_bundle.search(QUERY, where=bad)
    assert len(built_bundle.search(QUERY, k=50, where={f"f{i}": None for i in range(256)})) == 40  # the bound


def test_parse_where() -> None:
    assert parse_where(["brand=Acme", "price<50", 'colour in ["red", "blue"]', "stock >= 3", "x != null"]) == {
        "brand": "Acme",
        "price": ("<", 50),
        "colour": ("in", ["red", "blue"]),
        "stock": (">=", 3),
        "x": ("!=", None),
    }
    assert parse_where(['name="5"', "tag not in [1, 2]"]) == {"name": "5", "tag": ("not in", [1, 2])}
    for bad in ["nonsense", "=3", "a in 3"]:
        with pytest.raises(ConfigError):
            parse_where([bad])


# -- the CLI ------------------------------------------------------------------------------------------------


def test_cli_changes_and_filtered_search(
    own_bundle: Matcher, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(own_bundle.path)
    source = tmp_path / "new.csv"
    NEW.to_csv(source, index=False)
    assert main(["add", path, str(source), "--model", str(tiny_model_dir), "-q"]) == 0
    assert "add " + path + ": added 3; 3 titles encoded; 43 titles now" in capsys.readouterr().out
    assert main(["add", path, str(source), "--model", str(tiny_model_dir), "-q"]) == 1
    assert "already in the bundle; use upsert" in capsys.readouterr().err
    NEW.assign(price=1.0).to_csv(source, index=False)
    assert main(["upsert", path, str(source), "--model", str(tiny_model_dir), "-q"]) == 0
    assert "metadata updated 3; 0 titles encoded" in capsys.readouterr().out
    assert main(["remove", path, "5001", "5002", "--model", str(tiny_model_dir)]) == 0
    assert "removed 2; 0 titles encoded; 41 titles now" in capsys.readouterr().out
    assert main(["remove", path, "5001", "--model", str(tiny_model_dir)]) == 1
    assert "--missing-ok" in capsys.readouterr().err
    assert main(["compact", path, "--model", str(tiny_model_dir), "-q"]) == 0
    assert "compacted " + path + ": 41 titles, index Flat" in capsys.readouterr().out
    args = ["search", path, "tent", "--model", str(tiny_model_dir), "--where", "brand=Vandelay", "--where", "price<2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[5003] Vandelay red camping tent" in out
    assert out.count("[") == 1
    assert main(["search", path, "tent", "--model", str(tiny_model_dir), "--where", "oops"]) == 1
    assert "expected FIELD OP VALUE" in capsys.readouterr().err


# -- writers and readers ----------------------------------------------------------------------------------


def test_a_second_writer_gets_a_clear_error_or_waits(own_bundle: Matcher) -> None:
    path = own_bundle.path
    assert path is not None
    own_bundle.lock_timeout = 0
    with writer_lock(path), pytest.raises(BundleLockedError, match="being changed by another writer"):
        own_bundle.add(NEW, show_progress=False)
    assert len(own_bundle) == 40

    released = threading.Event()

    def hold() -> None:
        with writer_lock(path):
            released.wait(0.5)

    holder = threading.Thread(target=hold)
    holder.start()
    own_bundle.lock_timeout = 30
    report = own_bundle.add(NEW, show_progress=False)  # waits for the holder
    holder.join()
    assert report.count == 43


def test_a_reader_keeps_its_generation_until_it_refreshes(own_bundle: Matcher, tiny_encoder: Any) -> None:
    path = own_bundle.path
    assert path is not None
    reader = Matcher.load(path, encoder=tiny_encoder)
    first = reader.generation
    own_bundle.add(NEW, show_progress=False)
    own_bundle.remove([5001])
    # the reader's generation is still on disk and still answers as before
    assert (path / str(first)).is_dir()
    assert len(reader) == 40
    assert len(reader.search(QUERY, k=50)) == 40
    assert reader.refresh() is True
    assert reader.generation == own_bundle.generation
    assert len(reader.search(QUERY, k=50)) == 42
    assert reader.refresh() is False
    assert (path / str(first)).is_dir()  # a reader's refresh deletes nothing; the next write or GC does
    assert collect_garbage(path) == [first]  # nobody holds it any more
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("gen-")) == [own_bundle.generation]
    reader.close()


def test_manifest_checksums_cover_the_shared_vector_file_prefix(own_bundle: Matcher) -> None:
    path = own_bundle.path
    assert path is not None
    reader = Matcher.load(path, encoder=own_bundle.encoder)
    old = current_generation(path)
    own_bundle.add(NEW, show_progress=False)
    # the old generation's vector file grew (it is shared), yet it still verifies
    manifest = read_manifest(old, verify=True)
    assert manifest.growable == [VECTORS_FILE]
    assert (old / VECTORS_FILE).stat().st_size > manifest.sizes[VECTORS_FILE]
    reader.close()


def test_build_products_helper_still_builds(tmp_path: Path, tiny_encoder: Any) -> None:
    with build_products(tmp_path / "p", tiny_encoder) as m:
        assert m.generation == "gen-000001"


# -- the index for the size -----------------------------------------------------------------------------


def test_auto_index_tunes_ivf_and_refines_exactly(tmp_path: Path, tiny_encoder: Any, monkeypatch: pytest.MonkeyPatch):
    # pretend 40 titles are "large" so that auto picks IVF with lossy SQ8 codes and an exact refine
    monkeypatch.setattr("matching.vectors.autoindex.FLAT_MAX_FLOATS", 0)
    monkeypatch.setattr("matching.vectors.autoindex.MIN_POINTS_PER_LIST", 4)
    with fresh_build(make_catalogue(), tmp_path / "b", tiny_encoder) as m:
        record = m.manifest.index
        assert record["factory"].startswith("IVF")
        assert record["factory"].endswith(",SQ8")
        assert record["refine_factor"] == 2
        assert record["nprobe"] == record["tuning"]["value"] >= 1
        assert record["tuning"]["recall"] >= 0.95
        q = m.query_encoder.encode_queries([QUERY])
        scores, ids = m.index.search(q, 5, stored=m.store.vectors)
        # refined scores are exact inner products with the stored float32 vectors
        np.testing.assert_allclose(scores[0], np.asarray(m.store.vectors[ids[0]]) @ q[0], rtol=0, atol=1e-6)
        m.remove([1000])
        m.compact(show_progress=False)
        assert m.manifest.index["factory"] == record["factory"]
        assert "tuning" in m.manifest.index


def test_one_lock_however_the_path_is_spelled(own_bundle: Matcher, tiny_encoder: Any) -> None:
    path = own_bundle.path
    assert path is not None
    other_spelling = path.parent / ".." / path.parent.name / path.name
    with (
        Matcher.load(other_spelling, encoder=tiny_encoder, lock_timeout=0) as other,
        writer_lock(path),
        pytest.raises(BundleLockedError),
    ):
        other.add(NEW, show_progress=False)


def test_many_threads_share_one_matcher(built_bundle: Matcher) -> None:
    # more threads than SQLAlchemy's SingletonThreadPool would keep: none may lose its connection mid-search
    expected = [h.id for h in built_bundle.search(QUERY, k=5)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                assert [h.id for h in built_bundle.search(QUERY, k=5, where={"price": (">", 0)})] == expected
        except BaseException as exc:  # collected, re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
