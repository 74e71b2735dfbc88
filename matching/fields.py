"""Indexed metadata fields: one typed column per field over the store's row ids, so a ``where`` on them is a few
array operations instead of a SQLite scan of every row's JSON metadata.

A column holds numbers (float64; bools as 1/0, integers only up to 2**53, where float64 is exact) or texts (codes
into the field's sorted distinct values). A field whose values mix the two, hold lists or objects, or integers past
2**53 is not indexed: the SQL filter answers for it. Answers equal the SQL filter's, SQLite's rules included
(numbers sort before texts, texts compare as UTF-8 bytes, a comparison with NULL is false); tests compare the two on
random metadata. Evaluation: :mod:`matching.field_query`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
from safetensors.numpy import load_file, save_file

from matching.errors import BundleError, ConfigError
from matching.layout import FIELDS_ARRAYS, FIELDS_CONFIG
from matching.types import FieldKind

log = logging.getLogger(__name__)

FORMAT = "matching.fields"
FORMAT_VERSION = 1
EXACT_INT = 2**53  # float64 holds every integer up to this exactly
# automatic choice: every number field, and text fields of at most this many distinct values (a category, a brand;
# not a description), at most AUTO_MAX_FIELDS of them (most rows holding the field first)
AUTO_TEXT_LIMIT = 65_536
AUTO_MAX_FIELDS = 32
_NO = "no"  # a value no column can hold


@dataclass(frozen=True)
class FieldSpec:
    """Which metadata fields get a column: ``auto`` (numbers and low-cardinality texts) and/or the ``names`` given
    (any cardinality; a name whose values cannot be indexed is an error at build)."""

    auto: bool = True
    names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"auto": self.auto, "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FieldSpec:
        return cls(auto=bool(data.get("auto", True)), names=tuple(str(n) for n in data.get("names", ())))

    @classmethod
    def of(cls, index_fields: Sequence[str] | str | None) -> FieldSpec:
        """From a user's choice: ``"auto"``/None (automatic), ``"none"``/``[]`` (no columns), or field names."""
        if index_fields is None or index_fields == "auto":
            return cls()
        if index_fields == "none":
            return cls(auto=False)
        if isinstance(index_fields, str):
            return cls(auto=False, names=(index_fields,))
        names = tuple(dict.fromkeys(str(n) for n in index_fields))
        if any(not n for n in names):
            raise ConfigError("index_fields: a field name is empty; name metadata columns, or pass 'auto'")
        return cls(auto=False, names=names)


def indexed_fields(directory: Path) -> dict[str, str] | None:
    """The indexed fields of the store in ``directory`` and their kinds (None: a store from before field indexes),
    from ``fields.json`` alone."""
    path = directory / FIELDS_CONFIG
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return {str(c["name"]): str(c["kind"]) for c in meta["columns"]}
    except Exception as exc:  # damaged: say so, as loading the store would
        raise BundleError(f"field index in {str(directory)!r} is damaged: {exc}") from None


def parse_metadata(text: str) -> dict[str, Any]:
    """A row's metadata JSON as a dict; a key given twice keeps its first value, as SQLite's ``json_each`` (and so
    the SQL filter) reads it first."""
    parsed: dict[str, Any] = json.loads(text, object_pairs_hook=_first_wins)
    return parsed


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(reversed(pairs))


def value_kind(value: Any) -> str:
    """``number``, ``text``, ``null``, or ``no`` (a value no column holds) for one JSON metadata value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return FieldKind.NUMBER
    if isinstance(value, int):
        return FieldKind.NUMBER if -EXACT_INT <= value <= EXACT_INT else _NO
    if isinstance(value, float):
        return FieldKind.NUMBER if math.isfinite(value) else _NO
    if isinstance(value, str):
        return _NO if "\x00" in value else FieldKind.TEXT
    return _NO


@dataclass
class Column:
    """One field's values over row ids: ``present`` (the field holds a non-null value) and ``values`` (float64
    numbers, or int32 codes into ``dictionary``, sorted; -1 where absent)."""

    kind: FieldKind
    present: np.ndarray
    values: np.ndarray
    dictionary: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, kind: FieldKind, rows: int) -> Column:
        values = np.zeros(rows, np.float64) if kind is FieldKind.NUMBER else np.full(rows, -1, np.int32)
        return cls(kind, np.zeros(rows, np.bool_), values)

    def grow(self, rows: int) -> None:
        extra = rows - len(self.present)
        if extra > 0:
            self.present = np.concatenate([self.present, np.zeros(extra, np.bool_)])
            fill = np.zeros(extra, self.values.dtype) if self.kind is FieldKind.NUMBER else np.full(extra, -1, np.int32)
            self.values = np.concatenate([self.values, fill])

    def put(self, rows: np.ndarray, values: Sequence[Any]) -> None:
        """Set ``rows`` to ``values`` (None: absent); each value must be of this column's kind or null."""
        rows = np.asarray(rows, dtype=np.int64)
        there = np.array([v is not None for v in values], dtype=np.bool_)
        self.present[rows] = there
        given = [v for v in values if v is not None]
        if self.kind is FieldKind.NUMBER:
            self.values[rows] = 0.0
            self.values[rows[there]] = np.asarray(given, dtype=np.float64)
            return
        new = sorted(set(given).difference(self.dictionary))
        if new:
            self._widen(new)
        position = {text: i for i, text in enumerate(self.dictionary)}
        self.values[rows] = -1
        self.values[rows[there]] = np.fromiter((position[v] for v in given), dtype=np.int32, count=len(given))

    def _widen(self, new: list[str]) -> None:
        """Add texts to the sorted dictionary and renumber the codes."""
        merged = sorted([*self.dictionary, *new])
        position = {text: i for i, text in enumerate(merged)}
        remap = np.fromiter((position[t] for t in self.dictionary), dtype=np.int32, count=len(self.dictionary))
        if len(remap):
            self.values[self.present] = remap[self.values[self.present]]
        self.dictionary = merged


class FieldIndex:
    """Typed columns of the indexed metadata fields of one store generation, with the live rows."""

    def __init__(self, spec: FieldSpec, live: np.ndarray, columns: dict[str, Column], seen: Iterable[str] = ()) -> None:
        self.spec = spec
        self.live = live
        self.columns = columns
        self.seen = set(seen) | set(columns)  # every field some row held: a column is only started for a new one

    @property
    def rows(self) -> int:
        return len(self.live)

    # -- building and changing -------------------------------------------------------------------------------

    @classmethod
    def build(cls, spec: FieldSpec, row_ids: np.ndarray, metadata: Sequence[Mapping[str, Any]], rows: int) -> Self:
        """Columns over ``rows`` row ids from the live rows' metadata (``row_ids`` and ``metadata`` aligned)."""
        builder = FieldBuilder(spec)
        builder.add(row_ids, metadata)
        return cls.from_builder(builder, rows)

    @classmethod
    def from_builder(cls, builder: FieldBuilder, rows: int) -> Self:
        """The columns ``builder`` gathered, over ``rows`` row ids (the rows it was given are the live ones)."""
        spec, kinds = builder.spec, builder.kinds
        for name in spec.names:
            kind = kinds.get(name, set())
            if "\x00" in name:
                raise ConfigError(f"index field {name!r} cannot be indexed: SQLite cuts its name at the NUL; rename it")
            if _NO in kind or len(kind - {"null"}) > 1:
                raise ConfigError(
                    f"index field {name!r} cannot be indexed: its values {_mix(kind)}; a column holds numbers, or "
                    "texts (and nulls); drop it from --index-field, or make its values one kind"
                )
            if not kind - {"null"}:
                raise ConfigError(f"index field {name!r} holds no value in any row; check the metadata column name")
        live = np.zeros(rows, np.bool_)
        for part in builder.row_ids:
            live[part] = True
        columns = {name: builder.column(name, rows) for name in builder.chosen()}
        return cls(spec, live, columns, seen=kinds)

    def add(self, row_ids: np.ndarray, metadata: Sequence[Mapping[str, Any]]) -> None:
        """Rows appended under new row ids."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        if not len(row_ids):
            return
        rows = int(row_ids.max()) + 1
        if rows > self.rows:
            self.live = np.concatenate([self.live, np.zeros(rows - self.rows, np.bool_)])
        for column in self.columns.values():
            column.grow(self.rows)
        self.live[row_ids] = True
        self._put(row_ids, metadata)

    def grow(self, rows: int) -> None:
        """Cover ``rows`` row ids (the rows past the present ones dead)."""
        if rows > self.rows:
            self.live = np.concatenate([self.live, np.zeros(rows - self.rows, np.bool_)])
            for column in self.columns.values():
                column.grow(rows)

    def update(self, row_ids: np.ndarray, metadata: Sequence[Mapping[str, Any]]) -> None:
        """Live rows whose metadata was replaced."""
        self._put(np.asarray(row_ids, dtype=np.int64), metadata)

    def remove(self, row_ids: np.ndarray) -> None:
        row_ids = np.asarray(row_ids, dtype=np.int64)
        self.live[row_ids] = False
        for column in self.columns.values():
            column.present[row_ids] = False
            column.values[row_ids] = 0.0 if column.kind is FieldKind.NUMBER else -1

    def _put(self, row_ids: np.ndarray, metadata: Sequence[Mapping[str, Any]]) -> None:
        gathered = FieldBuilder(self.spec, known=self.seen)
        gathered.add(row_ids, metadata)
        for name, column in list(self.columns.items()):
            kind = gathered.kinds.get(name, {"null"}) - {"null"}
            if kind - {column.kind.value}:
                # the field's values are no longer one kind: the SQL filter answers for it from now on
                log.warning("metadata field %r is no longer indexed: it now holds %s", name, _mix(kind))
                del self.columns[name]
                continue
            values: list[Any] = [None] * len(row_ids)
            position = {r: i for i, r in enumerate(row_ids.tolist())}
            for ids, vals in gathered.values.get(name, []):
                for r, v in zip(ids.tolist(), vals, strict=True):
                    values[position[r]] = v
            column.put(row_ids, values)
        for name in gathered.chosen():  # fields no row held before (automatic ones while there is room)
            if name in self.spec.names or len(self.columns) < AUTO_MAX_FIELDS:
                self.columns[name] = gathered.column(name, self.rows)
        self.seen.update(gathered.kinds)

    # -- files -----------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        arrays = {"live": self.live}
        meta_columns = []
        for i, (name, column) in enumerate(sorted(self.columns.items())):
            arrays[f"c{i}.present"] = column.present
            arrays[f"c{i}.values"] = column.values
            meta_columns.append({"name": name, "kind": column.kind.value, "dictionary": column.dictionary})
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(directory / FIELDS_ARRAYS))
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "rows": self.rows,
            "spec": self.spec.to_dict(),
            "seen": sorted(self.seen),
            "columns": meta_columns,
        }
        (directory / FIELDS_CONFIG).write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> Self | None:
        """The field index saved in ``directory``; None for a store written before fields were indexed."""
        meta_path, arrays_path = directory / FIELDS_CONFIG, directory / FIELDS_ARRAYS
        if not meta_path.is_file() and not arrays_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            arrays = load_file(str(arrays_path))
            return cls._checked(meta, arrays)
        except Exception as exc:  # safetensors, json and the checks below raise their own kinds
            raise BundleError(f"field index in {str(directory)!r} is damaged or missing a file: {exc}") from None

    @classmethod
    def _checked(cls, meta: Any, arrays: dict[str, np.ndarray]) -> Self:
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a field index of format {FORMAT!r} version {FORMAT_VERSION}")
        rows, live = int(meta["rows"]), arrays["live"]
        if live.dtype != np.bool_ or live.shape != (rows,):
            raise ValueError("the live mask does not match the row count")
        columns = {}
        for i, entry in enumerate(meta["columns"]):
            kind = FieldKind(entry["kind"])
            present, values = arrays[f"c{i}.present"], arrays[f"c{i}.values"]
            dictionary = entry["dictionary"]
            dtype = np.float64 if kind is FieldKind.NUMBER else np.int32
            if (
                present.dtype != np.bool_
                or present.shape != (rows,)
                or values.dtype != dtype
                or values.shape != (rows,)
            ):
                raise ValueError(f"column {entry['name']!r} has the wrong type or shape")
            if not isinstance(dictionary, list) or not all(isinstance(t, str) for t in dictionary):
                raise ValueError(f"column {entry['name']!r}: its dictionary is not a list of texts")
            if kind is FieldKind.NUMBER and not np.isfinite(values[present]).all():
                raise ValueError(f"column {entry['name']!r} holds a number that is not finite")
            if kind is FieldKind.TEXT:
                codes = values[present]
                if dictionary != sorted(set(dictionary)) or (
                    len(codes) and not 0 <= codes.min() <= codes.max() < len(dictionary)
                ):
                    raise ValueError(f"column {entry['name']!r} has codes outside its sorted dictionary")
            columns[str(entry["name"])] = Column(kind, present, values, dictionary)
        seen = meta.get("seen", [])
        if not isinstance(meta["spec"], dict) or not isinstance(seen, list):
            raise ValueError("spec or seen is not of its type")
        return cls(FieldSpec.from_dict(meta["spec"]), live, columns, seen=[str(n) for n in seen])


class FieldBuilder:
    """Gathers the metadata fields' values batch by batch (as arrays: a million rows' dicts are not kept), then
    chooses the fields to index and makes their columns. Fields in ``known`` are never started (a column must
    cover every row that holds its field)."""

    def __init__(self, spec: FieldSpec, known: Iterable[str] = ()) -> None:
        self.spec = spec
        self.known = set(known)
        self.row_ids: list[np.ndarray] = []
        self.kinds: dict[str, set[str]] = {}
        self.values: dict[str, list[tuple[np.ndarray, Any]]] = {}  # (row ids, float64 array or list of texts)
        self.counts: dict[str, int] = {}
        self.distinct: dict[str, set[str]] = {}  # texts, counted up to AUTO_TEXT_LIMIT + 1

    def add(self, row_ids: np.ndarray, metadata: Sequence[Mapping[str, Any]]) -> None:
        row_ids = np.asarray(row_ids, dtype=np.int64)
        self.row_ids.append(row_ids)
        part: dict[str, tuple[list[int], list[Any]]] = {}
        for row, meta in zip(row_ids.tolist(), metadata, strict=True):
            for name, value in meta.items():
                kind = value_kind(value)
                if "\x00" in name:  # SQLite's json_each cuts a key at a NUL: the SQL filter reads it as its prefix
                    self.kinds.setdefault(name.split("\x00")[0], set()).add(_NO)
                    kind = _NO
                self.kinds.setdefault(name, set()).add(kind)
                if kind != "null":
                    ids, vals = part.setdefault(name, ([], []))
                    ids.append(row)
                    vals.append(int(value) if isinstance(value, bool) else value)
        for name, (ids, vals) in part.items():
            kinds = self.kinds[name]
            if _NO in kinds or len(kinds - {"null"}) > 1:
                self.values.pop(name, None)  # never indexed: stop keeping its values
                continue
            self.counts[name] = self.counts.get(name, 0) + len(ids)
            if FieldKind.TEXT in kinds:
                seen = self.distinct.setdefault(name, set())
                if len(seen) <= AUTO_TEXT_LIMIT:
                    seen.update(vals)
                held: Any = [sys.intern(v) for v in vals]
            else:
                held = np.asarray(vals, dtype=np.float64)
            self.values.setdefault(name, []).append((np.asarray(ids, dtype=np.int64), held))

    def _usable(self, name: str) -> bool:
        kinds = self.kinds[name]
        return name not in self.known and _NO not in kinds and len(kinds - {"null"}) == 1 and name in self.values

    def chosen(self) -> list[str]:
        """The fields to give a column: the named ones, and (auto) numbers and low-cardinality texts, most rows
        holding the field first."""
        chosen = [n for n in self.spec.names if n in self.kinds and self._usable(n)]
        if self.spec.auto:
            candidates = [
                n
                for n in self.kinds
                if n not in chosen
                and self._usable(n)
                and (FieldKind.NUMBER in self.kinds[n] or len(self.distinct[n]) <= AUTO_TEXT_LIMIT)
            ]
            candidates.sort(key=lambda n: (-self.counts[n], n))
            chosen += candidates[: max(0, AUTO_MAX_FIELDS - len(chosen))]
        return chosen

    def column(self, name: str, rows: int) -> Column:
        column = Column.empty(FieldKind(next(iter(self.kinds[name] - {"null"}))), rows)
        parts = self.values[name]
        ids = np.concatenate([p[0] for p in parts])
        if column.kind is FieldKind.NUMBER:
            column.present[ids] = True
            column.values[ids] = np.concatenate([p[1] for p in parts])
        else:
            column.put(ids, [v for p in parts for v in p[1]])
        return column


def _mix(kinds: set[str]) -> str:
    if _NO in kinds:
        return "include lists, objects, integers past 2**53 or texts with NUL characters"
    return "mix " + " and ".join(sorted(kinds - {"null"}))
