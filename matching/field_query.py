"""A ``where`` over indexed metadata fields (:mod:`matching.fields`): each condition on a column becomes a boolean
mask over row ids, with SQLite's answer for every case (the SQL filter answers the conditions no column can).

SQLite's rules, as the SQL filter (a JSON value against a bound parameter) applies them: a number and a text are
never equal, every number sorts before every text, texts compare as UTF-8 bytes (Python's code-point order is the
same), and any comparison with a missing or null field is false except ``== None`` (missing or null) and
``!= None`` (present). ``not in`` a list holding None is never true (``x NOT IN (NULL, ...)`` is NULL or false);
``not in []`` is true for every row.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

import numpy as np

from matching.fields import EXACT_INT, Column, FieldIndex
from matching.filters import Condition, WhereValue
from matching.types import FieldKind


def evaluate(index: FieldIndex, conditions: Sequence[Condition]) -> tuple[np.ndarray | None, list[Condition]]:
    """The live rows passing every condition a column answers (None: no condition was), and the conditions left
    for the SQL filter."""
    mask: np.ndarray | None = None
    rest: list[Condition] = []
    for condition in conditions:
        key, op, value = condition
        column = index.columns.get(key)
        part = None if column is None else _condition(column, op, value)
        if part is None:
            rest.append(condition)
            continue
        mask = part if mask is None else mask & part
    if mask is not None:
        mask &= index.live
    return mask, rest


def _condition(column: Column, op: str, value: WhereValue | list[WhereValue]) -> np.ndarray | None:
    if isinstance(value, list):
        return _member(column, op == "in", value)
    if value is None:
        return ~column.present if op == "==" else column.present.copy()
    if not _comparable(value):
        return None
    if (column.kind is FieldKind.NUMBER) == isinstance(value, int | float):
        return _compare(column, op, value)
    # a number against a text, or a text against a number: only != and the order between the two kinds decide
    number_first = column.kind is FieldKind.NUMBER  # the column's values sort before the value
    holds = {
        "==": False,
        "!=": True,
        "<": number_first,
        "<=": number_first,
        ">": not number_first,
        ">=": not number_first,
    }[op]
    return column.present.copy() if holds else np.zeros(len(column.present), np.bool_)


def _comparable(value: WhereValue) -> bool:
    """Whether a column compares exactly with ``value`` (float64 holds integers only up to 2**53)."""
    return not (isinstance(value, int) and not -EXACT_INT <= value <= EXACT_INT)


def _compare(column: Column, op: str, value: int | float | str) -> np.ndarray:
    """The present rows whose value compares ``op`` with a value of the column's own kind."""
    if column.kind is FieldKind.NUMBER:
        target: float | int = float(value)
        values = column.values
    else:
        assert isinstance(value, str)
        words = column.dictionary
        values = column.values
        lo, hi = bisect_left(words, value), bisect_right(words, value)
        # codes in [lo, hi) equal the value (hi - lo is 0 or 1); so "< value" is "< lo", "<= value" is "< hi"
        op, target = {
            "==": ("==", lo) if hi > lo else ("none", 0),
            "!=": ("!=", lo) if hi > lo else ("all", 0),
            "<": ("<", lo),
            "<=": ("<", hi),
            ">": (">=", hi),
            ">=": (">=", lo),
        }[op]
    if op == "none":
        return np.zeros(len(values), np.bool_)
    if op == "all":
        return column.present.copy()
    compared: np.ndarray = {
        "==": np.equal,
        "!=": np.not_equal,
        "<": np.less,
        "<=": np.less_equal,
        ">": np.greater,
        ">=": np.greater_equal,
    }[op](values, target)
    out: np.ndarray = compared & column.present
    return out


def _member(column: Column, inside: bool, members: list[WhereValue]) -> np.ndarray | None:
    if not all(m is None or _comparable(m) for m in members):
        return None
    if not members:  # "IN ()" is false and "NOT IN ()" true for every row, a missing field's too
        return np.full(len(column.present), not inside, np.bool_)
    if not inside and any(m is None for m in members):
        return np.zeros(len(column.present), np.bool_)
    if column.kind is FieldKind.NUMBER:
        wanted = np.array([float(m) for m in members if isinstance(m, int | float)], dtype=np.float64)
    else:
        words = column.dictionary
        texts = [m for m in members if isinstance(m, str)]
        found = [c for c, m in ((bisect_left(words, m), m) for m in texts) if c < len(words) and words[c] == m]
        wanted = np.array(found, dtype=np.int32)
    hit = np.isin(column.values, wanted)
    out: np.ndarray = (hit if inside else ~hit) & column.present
    return out
