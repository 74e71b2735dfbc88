"""Issue #22, item 3: every metadata value round-trips exactly, or the row is refused naming its row and column.

The rule (README, "Metadata values"): missing (None, NaN, NA, NaT) is null; numbers, text and booleans are
themselves; lists and arrays are JSON arrays and dicts (structs) JSON objects, element by element; dates and times
are ISO 8601 text; a decimal is the float that gives it back as written. Infinities, bytes, other objects, list or
byte titles and boolean or list ids are refused.
"""

from __future__ import annotations

import datetime
import decimal
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from matching.errors import BadRowError
from matching.ingest import CatalogueReader
from matching.matcher import Matcher

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

STAMP = datetime.datetime(2024, 1, 2, 3, 4, 5)

# (column, Arrow array of two rows, what the two rows store)
PARQUET_COLUMNS: list[tuple[str, Any, list[Any]]] = [
    ("tags", pa.array([[1, 2], None]), [[1, 2], None]),
    ("nested", pa.array([[[1], [2, 3]], []]), [[[1], [2, 3]], []]),
    ("struct", pa.array([{"x": 1, "y": "z"}, None]), [{"x": 1, "y": "z"}, None]),
    ("ts", pa.array([STAMP, None], pa.timestamp("us")), ["2024-01-02T03:04:05", None]),
    ("day", pa.array([datetime.date(2024, 1, 2), None]), ["2024-01-02", None]),
    ("price", pa.array([decimal.Decimal("19.99"), None], pa.decimal128(10, 2)), [19.99, None]),
    ("count", pa.array([2**62, None], pa.int64()), [2**62, None]),
    ("ratio", pa.array([0.1, float("nan")]), [0.1, None]),  # NaN is pandas' missing value: null
]


def metadata(source: Any) -> list[dict[str, Any]]:
    return [m for chunk in CatalogueReader(source) for m in chunk.metadata]


def test_parquet_values_round_trip_exactly(tmp_path: Path) -> None:
    columns = {"id": pa.array([1, 2]), "title": pa.array(["red lamp", "blue lamp"])}
    columns |= {name: array for name, array, _ in PARQUET_COLUMNS}
    pq.write_table(pa.table(columns), tmp_path / "c.parquet")
    want = [{name: stored[i] for name, _, stored in PARQUET_COLUMNS} for i in range(2)]
    assert metadata(tmp_path / "c.parquet") == want


def test_jsonl_and_dataframe_values_round_trip_exactly(tmp_path: Path) -> None:
    rows = [
        {"id": 1, "title": "red lamp", "tags": [1, "a", None], "o": {"k": [True, None]}, "n": None, "f": 0.5},
        {"id": 2, "title": "blue lamp", "tags": [], "o": {}, "n": 2**70, "f": -0.0},
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    want = [{k: v for k, v in r.items() if k not in ("id", "title")} for r in rows]
    assert metadata(tmp_path / "c.jsonl") == want
    frame = pd.DataFrame(
        {
            "id": [1, 2],
            "title": ["red lamp", "blue lamp"],
            "arr": [np.array([1, 2]), np.array([0.5])],
            "ts": [pd.Timestamp(STAMP), pd.NaT],
            "when": [np.datetime64("2024-01-02T03:04:05"), np.datetime64("NaT")],
            "x": [np.nan, 1.5],
            "flag": [np.bool_(True), None],
        }
    )
    assert metadata(frame) == [
        {"arr": [1, 2], "ts": "2024-01-02T03:04:05", "when": "2024-01-02T03:04:05", "x": None, "flag": True},
        {"arr": [0.5], "ts": None, "when": None, "x": 1.5, "flag": None},
    ]


def _parquet(**columns: Any) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        pq.write_table(pa.table({"id": [1, 2], "title": ["red lamp", "blue lamp"], **columns}), folder / "c.parquet")
        return folder / "c.parquet"

    return make


def _jsonl(second: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / "c.jsonl").write_text('{"id": 1, "title": "red lamp"}\n' + second + "\n", encoding="utf-8")
        return folder / "c.jsonl"

    return make


def _frame(**columns: list[Any]) -> Callable[[Path], pd.DataFrame]:
    base: dict[str, list[Any]] = {"id": [1, 2], "title": ["red lamp", "blue lamp"]}
    return lambda folder: pd.DataFrame({**base, **columns})


REFUSED: list[tuple[str, Callable[[Path], Any], str]] = [
    ("parquet-bytes", _parquet(b=[None, b"\x00\x01"]), "row 2 (id '2'): column 'b' holds bytes b'\\x00\\x01'"),
    ("parquet-inf", _parquet(x=[1.0, float("inf")]), "row 2 (id '2'): column 'x' holds inf, which JSON cannot store"),
    ("parquet-list-title", _parquet(id=[1, 2], title=[["a"], ["b", "c"]]), "row 1: the title column 'title' holds"),
    ("parquet-bool-id", _parquet(id=[True, False]), "row 1: the id True in column 'id' is not a string or a number"),
    ("jsonl-infinity", _jsonl('{"id": 2, "title": "x", "v": -Infinity}'), "row 2 (id '2'): column 'v' holds -inf"),
    ("jsonl-list-title", _jsonl('{"id": 2, "title": ["a", "b"]}'), "row 2: the title column 'title' holds ['a', 'b']"),
    ("jsonl-bool-id", _jsonl('{"id": true, "title": "x"}'), "row 2: the id True in column 'id' is not a string"),
    ("jsonl-nested-inf", _jsonl('{"id": 2, "title": "x", "v": [1, Infinity]}'), "column 'v' holds inf"),
    ("frame-bytes", _frame(b=["ok", b"\x00"]), "row 2 (id '2'): column 'b' holds bytes b'\\x00'"),
    ("frame-inf", _frame(x=[1.0, -np.inf]), "row 2 (id '2'): column 'x' holds -inf"),
    ("frame-list-title", _frame(title=["a", ["b", "c"]]), "row 2: the title column 'title' holds ['b', 'c'], not text"),
    ("frame-bool-id", _frame(id=[1, True]), "row 2: the id True in column 'id' is not a string or a number"),
    ("frame-timedelta", _frame(d=[pd.Timedelta(0), None]), "row 1 (id '1'): column 'd' holds Timedelta"),
    ("frame-inexact-decimal", _frame(d=[decimal.Decimal("0.1000000000000000000001"), None]), "holds Decimal"),
    ("frame-object", _frame(o=[object(), None]), "row 1 (id '1'): column 'o' holds object"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_value_metadata_cannot_store_is_refused_naming_row_and_column(
    tmp_path: Path, make: Callable[[Path], Any], message: str
) -> None:
    with pytest.raises(BadRowError) as caught:
        metadata(make(tmp_path))
    assert message in str(caught.value)
    assert "skip_bad_rows=True" in str(caught.value)
    skipping = CatalogueReader(make(tmp_path), skip_bad_rows=True)
    kept = sum(len(c) for c in skipping)
    assert skipping.skipped >= 1
    assert kept + skipping.skipped == 2


def test_a_null_timestamp_is_null_in_a_bundle(tmp_path: Path, tiny_encoder: Any) -> None:
    table = pa.table(
        {
            "id": [1, 2],
            "title": ["red lamp", "blue lamp"],
            "ts": pa.array([STAMP, None], pa.timestamp("us")),
            "tags": pa.array([["a", "b"], []]),
        }
    )
    pq.write_table(table, tmp_path / "c.parquet")
    with Matcher.build(tmp_path / "c.parquet", tmp_path / "b", encoder=tiny_encoder, show_progress=False) as m:
        assert [h.id for h in m.search("lamp", k=5, where={"ts": None})] == [2]
        assert [h.id for h in m.search("lamp", k=5, where={"ts": "2024-01-02T03:04:05"})] == [1]
        stored = m.store.lookup(["1", "2"])
        assert [stored[i].metadata for i in ("1", "2")] == [
            {"ts": "2024-01-02T03:04:05", "tags": ["a", "b"]},
            {"ts": None, "tags": []},
        ]
