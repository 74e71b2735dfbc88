"""Indexed metadata fields: the columns answer every ``where`` exactly as the SQL filter over the JSON metadata does,
through builds, changes, reloads and old bundles without them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from matching import Matcher
from matching.bundle import current_generation, read_manifest, write_manifest
from matching.errors import ConfigError
from matching.field_query import evaluate
from matching.fields import FieldIndex, FieldSpec
from matching.filters import conditions
from matching.layout import FIELDS_ARRAYS, FIELDS_CONFIG
from matching.store import Store
from matching.types import FieldKind, IdType

TEXTS = ["", "a", "A", "b", "ab", "é", "zz", "草", "😀", "10", "a b"]
NUMBERS: list[Any] = [0, 1, -1, 2, 0.5, -0.0, 1.0, 3.25, 10, 2**53, -(2**53), True, False, 1e300]


def _value(rng: random.Random, kind: str) -> Any:
    pick = rng.random()
    if pick < 0.1:
        return None
    if kind == "number":
        return rng.choice(NUMBERS)
    if kind == "text":
        return rng.choice(TEXTS)
    return rng.choice([*NUMBERS, *TEXTS, [1, 2], {"x": 1}, 2**60])  # mixed: never indexed


def _metadata(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        meta = {}
        for name, kind in (("price", "number"), ("brand", "text"), ("misc", "mixed"), ("rare", "text")):
            if rng.random() < (0.15 if name == "rare" else 0.85):  # absent otherwise
                meta[name] = _value(rng, kind)
        rows.append(meta)
    return rows


def _where(rng: random.Random) -> dict[str, Any]:
    where: dict[str, Any] = {}
    for _ in range(rng.randint(1, 2)):
        field = rng.choice(["price", "brand", "misc", "rare", "absent"])
        op = rng.choice(["==", "!=", "<", "<=", ">", ">=", "in", "not in"])
        pool: list[Any] = [*NUMBERS, *TEXTS, "c", 0.75, 2**53 + 1, None]
        if op in ("in", "not in"):
            value: Any = rng.sample(pool, rng.randint(0, 4))
        else:
            value = rng.choice([v for v in pool if v is not None or op in ("==", "!=")])
        where.setdefault(field, {})[op] = value
    return where


def _write_store(directory: Path, metadata: list[dict[str, Any]], spec: FieldSpec | None = None) -> Store:
    directory.mkdir(parents=True, exist_ok=True)
    writer = Store.create(directory, 4, spec)
    n = len(metadata)
    writer.append(
        [str(i) for i in range(n)],
        [f"title {i}" for i in range(n)],
        [json.dumps(m) for m in metadata],
        np.eye(n, 4, dtype=np.float32),
    )
    writer.finish(IdType.INT)
    return Store.open(directory)


def test_columns_answer_as_sql_on_random_metadata(tmp_path: Path) -> None:
    rng = random.Random(7)
    store = _write_store(tmp_path / "s", _metadata(rng, 400))
    try:
        assert store.fields is not None
        assert sorted(store.fields.columns) == ["brand", "price", "rare"]  # "misc" mixes kinds
        assert store.fields.columns["price"].kind is FieldKind.NUMBER
        answered = 0
        for _ in range(600):
            where = _where(rng)
            mask, rest = evaluate(store.fields, conditions(where))
            answered += mask is not None and not rest
            assert np.array_equal(store.filter_ids(where), store.sql_filter_ids(where)), where
        assert answered > 250  # most of them without SQL
    finally:
        store.close()


def test_hand_computed_cases(tmp_path: Path) -> None:
    metadata = [{"p": 1, "c": "b"}, {"p": 2.5, "c": "a"}, {"p": None}, {}, {"p": True, "c": "B"}]
    store = _write_store(tmp_path / "s", metadata)
    try:
        cases: list[tuple[dict[str, Any], list[int]]] = [
            ({"p": 1}, [0, 4]),  # True is 1
            ({"p": {">": 1}}, [1]),
            ({"p": {"<": "x"}}, [0, 1, 4]),  # every number sorts before every text
            ({"p": None}, [2, 3]),
            ({"p": {"!=": None}}, [0, 1, 4]),
            ({"p": {"!=": 1}}, [1]),  # a missing or null field never compares
            ({"c": {">=": "a"}}, [0, 1]),  # "B" < "a" as bytes
            ({"c": {"<": "b"}}, [1, 4]),
            ({"c": {"not in": ["a", None]}}, []),
            ({"c": {"in": ["b", 5, None]}}, [0]),
            ({"c": {">": 5}}, [0, 1, 4]),
            ({"p": {"<=": 2**53 + 1}}, [0, 1, 4]),  # past float64's exact integers: SQL answers
        ]
        for where, expected in cases:
            assert store.filter_ids(where).tolist() == expected, where
            assert store.sql_filter_ids(where).tolist() == expected, where
    finally:
        store.close()


def test_spec_names_and_errors(tmp_path: Path) -> None:
    rng = random.Random(3)
    metadata = _metadata(rng, 50)
    store = _write_store(tmp_path / "a", metadata, FieldSpec(auto=False, names=("brand",)))
    assert store.fields is not None
    assert list(store.fields.columns) == ["brand"]
    store.close()
    store = _write_store(tmp_path / "b", metadata, FieldSpec.of("none"))
    assert store.fields is not None
    assert not store.fields.columns
    where = {"price": {">": 0}}
    assert np.array_equal(store.filter_ids(where), store.sql_filter_ids(where))
    store.close()
    with pytest.raises(ConfigError, match="'misc' cannot be indexed"):
        _write_store(tmp_path / "c", metadata, FieldSpec(auto=False, names=("misc",)))
    with pytest.raises(ConfigError, match="'nowhere' holds no value"):
        _write_store(tmp_path / "d", metadata, FieldSpec(auto=False, names=("nowhere",)))
    assert FieldSpec.of(["a", "a", "b"]) == FieldSpec(auto=False, names=("a", "b"))
    assert FieldSpec.from_dict(FieldSpec(auto=False, names=("x",)).to_dict()) == FieldSpec(auto=False, names=("x",))


def test_changes_keep_columns_equal_to_a_fresh_index(tmp_path: Path) -> None:
    rng = random.Random(11)
    metadata = _metadata(rng, 120)
    index = FieldIndex.build(FieldSpec(), np.arange(120), metadata, 120)
    live = {i: metadata[i] for i in range(120)}
    index.remove(np.array([3, 4, 50]))
    for i in (3, 4, 50):
        del live[i]
    updated = {7: {"price": 99, "brand": "new", "extra": 5}, 8: {"brand": "zz top"}, 9: {}}
    index.update(np.array(list(updated)), list(updated.values()))
    live.update(updated)
    added = [{"price": 1.5, "brand": "a"}, {"brand": "草莓", "extra": 7}]
    index.add(np.array([120, 121]), added)
    live.update({120: added[0], 121: added[1]})
    ids = np.array(sorted(live))
    fresh = FieldIndex.build(FieldSpec(), ids, [live[i] for i in ids], 122)
    assert np.array_equal(index.live, fresh.live)
    assert set(index.columns) == set(fresh.columns) == {"price", "brand", "rare", "extra"}  # "extra": a new field
    for name, column in index.columns.items():
        other = fresh.columns[name]
        assert np.array_equal(column.present, other.present), name
        got = column.values[column.present]
        want = other.values[other.present]
        if column.kind is FieldKind.TEXT:
            got = np.array(column.dictionary, dtype=object)[got]
            want = np.array(other.dictionary, dtype=object)[want]
        assert list(got) == list(want), name
    assert index.columns["brand"].values[3] == -1  # a removed row holds nothing
    assert index.columns["price"].values[3] == 0.0
    index.update(np.array([10]), [{"price": "cheap"}])  # the number column breaks: dropped, SQL answers
    assert "price" not in index.columns


def test_bundle_changes_reload_and_old_layout(tmp_path: Path, tiny_encoder: Any) -> None:
    rng = random.Random(5)
    metadata = _metadata(rng, 60)
    frame = pd.DataFrame({"id": range(60), "title": [f"red shoe {i}" for i in range(60)]})
    for name in ("price", "brand"):
        frame[name] = [m.get(name) for m in metadata]
    path = tmp_path / "b"
    matcher = Matcher.build(frame, path, encoder=tiny_encoder, show_progress=False)
    where = {"price": {">": 0.5}, "brand": {"!=": "a"}}
    before = [m.id for m in matcher.search("red shoe", k=60, where=where)]
    matcher.upsert(pd.DataFrame({"id": [1, 2], "title": ["red shoe 1", "red shoe x"], "price": [7, 8], "brand": "q"}))
    matcher.remove([5])
    snap_store = Store.open(current_generation(path))
    try:
        assert snap_store.fields is not None
        assert {"price", "brand"} <= set(snap_store.fields.columns)
        for _ in range(100):
            w = _where(rng)
            assert np.array_equal(snap_store.filter_ids(w), snap_store.sql_filter_ids(w)), w
    finally:
        snap_store.close()
    after = {m.id for m in Matcher.load(path, encoder=tiny_encoder).search("red shoe", k=60, where=where)}
    assert {1, 2} <= after
    assert 5 not in after
    assert set(before) - {1, 2, 5} <= after
    # a bundle written before fields were indexed: no field files; it loads, filters by SQL, takes changes
    live = current_generation(path)
    for name in (FIELDS_CONFIG, FIELDS_ARRAYS):
        (live / name).unlink()
    write_manifest(live, read_manifest(live, verify=False))
    old = Matcher.load(path, encoder=tiny_encoder, verify=True)
    assert {m.id for m in old.search("red shoe", k=60, where=where)} == after
    old.remove([6])
    assert not (current_generation(path) / FIELDS_CONFIG).exists()
    old.compact(show_progress=False)  # compaction writes them
    assert (current_generation(path) / FIELDS_CONFIG).exists()
    assert {m.id for m in old.search("red shoe", k=60, where=where)} == after - {6}


def test_names_with_nul_and_repeated_keys_answer_as_sql(tmp_path: Path) -> None:
    rows = [{"a\x00b": 1}, {"a\x00b": 2}, {"a": 5}, {}]
    store = _write_store(tmp_path / "nul", rows)
    try:
        assert store.fields is not None
        assert "a\x00b" not in store.fields.columns  # SQLite reads that key as "a"
        for where in ({"a\x00b": 1}, {"a\x00b": None}, {"a": {"!=": None}}, {"a": 5}):
            assert np.array_equal(store.filter_ids(where), store.sql_filter_ids(where)), where
    finally:
        store.close()
    directory = tmp_path / "dup"
    directory.mkdir()
    writer = Store.create(directory, 4)
    texts = ['{"p": 1, "p": 2}', '{"p": 2}', '{"p": 3, "p": 1}']  # only hand-written JSON repeats a key
    writer.append(["0", "1", "2"], ["a", "b", "c"], texts, np.eye(3, 4, dtype=np.float32))
    writer.finish(IdType.INT)
    store = Store.open(directory)
    try:
        for where in ({"p": 1}, {"p": 2}, {"p": {">": 1}}):
            assert np.array_equal(store.filter_ids(where), store.sql_filter_ids(where)), where
    finally:
        store.close()


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "spec", "deep", "shape", "dictionary", "nan", "missing"],
)
def test_a_damaged_field_index_is_a_bundle_error(tmp_path: Path, damage: str) -> None:
    from safetensors.numpy import load_file, save_file

    from matching.errors import BundleError

    _write_store(tmp_path / "s", [{"p": 1.5, "c": "x"}, {"p": 2.0, "c": "y"}]).close()
    arrays_path, meta_path = tmp_path / "s" / FIELDS_ARRAYS, tmp_path / "s" / FIELDS_CONFIG
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    number = next(i for i, c in enumerate(meta["columns"]) if c["kind"] == "number")
    arrays = load_file(str(arrays_path))
    if damage == "truncate":
        arrays_path.write_bytes(arrays_path.read_bytes()[:20])
    elif damage == "garbage":
        arrays_path.write_bytes(b"\xff" * 64)
    elif damage == "spec":
        meta_path.write_text(json.dumps({**meta, "spec": None}), encoding="utf-8")
    elif damage == "deep":
        meta_path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    elif damage == "shape":
        arrays[f"c{number}.values"] = np.zeros((2, 2))
        save_file(arrays, str(arrays_path))
    elif damage == "dictionary":
        meta["columns"][1 - number]["dictionary"] = [1, 2]
        meta_path.write_text(json.dumps(meta), encoding="utf-8")
    elif damage == "nan":
        arrays[f"c{number}.values"] = np.array([np.nan, 1.0])
        save_file(arrays, str(arrays_path))
    else:
        meta_path.unlink()
    store = Store.open(tmp_path / "s")  # read on first use
    with pytest.raises(BundleError, match="field index"):
        _ = store.fields
    store.close()


def test_new_fields_in_changes_stay_under_the_automatic_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from matching import fields as module

    monkeypatch.setattr(module, "AUTO_MAX_FIELDS", 3)
    index = FieldIndex.build(FieldSpec(), np.arange(2), [{"a": 1, "b": "x"}, {"a": 2}], 2)
    index.add(np.array([2]), [{"c": 1, "d": 2, "e": "y"}])
    assert len(index.columns) == 3
    assert {"a", "b"} <= set(index.columns)


def test_enum_values_in_a_dataframe_are_indexed_as_their_plain_values(tmp_path: Path, tiny_encoder: Any) -> None:
    """Metadata cells of a str or int subclass (enums) are stored, and indexed, as the plain values JSON writes
    for them: the field columns take the build's metadata dicts without a JSON round trip."""
    from enum import IntEnum, StrEnum

    class Colour(StrEnum):
        RED = "red"
        BLUE = "blue"

    class Size(IntEnum):
        S = 1
        L = 3

    frame = pd.DataFrame(
        {
            "id": range(6),
            "title": [f"shoe {i}" for i in range(6)],
            "colour": pd.Series([Colour.RED, Colour.BLUE] * 3, dtype=object),  # (else pandas makes them str)
            "size": pd.Series([Size.S, Size.L, Size.L, Size.S, Size.L, Size.S], dtype=object),
        }
    )
    with Matcher.build(frame, tmp_path / "b", encoder=tiny_encoder, show_progress=False) as matcher:
        assert matcher.store.fields is not None
        assert {"colour", "size"} <= set(matcher.store.fields.columns)
        stored = matcher.store.get([0])[0].metadata
        assert stored == {"colour": "red", "size": 1}
        assert [type(v) for v in stored.values()] == [str, int]
        for where in ({"colour": "blue"}, {"size": {">": 2}}, {"colour": "red", "size": 1}):
            got = matcher.store.filter_ids(where)
            np.testing.assert_array_equal(got, matcher.store.sql_filter_ids(where))
        np.testing.assert_array_equal(matcher.store.filter_ids({"colour": "blue"}), [1, 3, 5])
