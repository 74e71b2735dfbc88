"""The one metadata filter grammar (``where``): checked, bounded, and turned into SQL over a JSON column.

A ``where`` is ``{field: condition}``; a condition is a value (equality), a list (one of), an ``(op, value)``
pair, or ``{op: value}`` (several on one field). It nests at most three levels (``{field: {op: [values]}}``),
and its size is bounded, so a request can neither exhaust the parser's stack nor SQLite's expression limits.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, SQLColumnExpression, func, literal, select

from matching.errors import ConfigError

# a value, or an (operator, value) pair, or a list of allowed values
WhereValue = str | int | float | bool | None
Where = Mapping[str, Any]
Condition = tuple[str, str, WhereValue | list[WhereValue]]  # (field, operator, value or values)

_COMPARE = ("==", "!=", "<", "<=", ">", ">=")
_MEMBER = ("in", "not in")
# SQLite nests a chain of ANDs one level per condition and stops at 1,000 levels
MAX_CONDITIONS = 256
# values of "in" lists, all fields together: stays under SQLite's 32,766 bound variables per statement
MAX_VALUES = 10_000
_SHAPE = "a where is {field: value}, {field: [values]} or {field: {operator: value}}"


def where_from_json(text: str | None) -> dict[str, Any] | None:
    """A ``where`` sent as JSON text (a query parameter), checked; ``None`` for no text."""
    if text is None or not text.strip():
        return None
    try:
        where = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f'where is not JSON ({exc.msg}); e.g. where={{"price": {{"<": 50}}}}') from None
    except RecursionError:
        raise ConfigError(f"where nests deeper than the JSON parser goes; {_SHAPE}") from None
    except ValueError as exc:  # an integer past Python's 4,300 digits
        raise ConfigError(f"where holds a value that cannot be read: {exc}") from None
    conditions(where)
    return dict(where)


def conditions(where: Any) -> list[Condition]:
    """The (field, operator, value) triples of ``where``, each checked; ConfigError naming the first problem."""
    if not isinstance(where, Mapping):
        raise ConfigError(
            f"where must be a JSON object (a dict) of field -> condition, "
            f'e.g. {{"brand": "acme", "price": {{"<": 50}}}}, got {_kind(where)}'
        )
    out: list[Condition] = []
    values = 0
    for key, spec in where.items():
        if not isinstance(key, str) or _broken(key):
            raise ConfigError(f"where: {_show(key)} is not a metadata field name (a string of valid Unicode)")
        for op, value in _operators(key, spec):
            out.append((key, op, _values(key, op, value)))
            values += len(value) if isinstance(value, list | tuple | set | frozenset) else 1
        if len(out) > MAX_CONDITIONS:
            raise ConfigError(f"where has more than {MAX_CONDITIONS} conditions; filter on fewer fields")
        if values > MAX_VALUES:
            raise ConfigError(f"where lists more than {MAX_VALUES} values; give shorter 'in' lists")
    return out


def where_clauses(column: SQLColumnExpression[str], where: Where) -> list[ColumnElement[bool]]:
    """SQL conditions on the JSON text ``column`` for a filter such as ``{"brand": "acme", "price": ("<", 50)}``.

    A value means equality (``None`` matches a missing or null field), a list means "one of", an
    ``(op, value)`` pair compares, with op one of ``== != < <= > >= in``, ``not in``, and a dict of
    ``{op: value}`` applies several to one field (a range: ``{"price": {">=": 10, "<": 20}}``; the form JSON
    requests use). Booleans compare as 1 and 0, as SQLite stores them. Keys and values are always bound parameters.
    """
    fields: dict[str, ColumnElement[Any]] = {}
    out = []
    for key, op, value in conditions(where):
        if key not in fields:
            fields[key] = field_value(column, key)
        out.append(_clause(fields[key], op, value))
    return out


def field_value(column: SQLColumnExpression[str], key: str) -> ColumnElement[Any]:
    """The value of metadata field ``key`` in the JSON text ``column`` (NULL where missing, 1/0 for true/false).

    The key is a bound parameter compared with the keys ``json_each`` decodes, so any key the store holds can be
    filtered: a JSON path built from it missed keys with a backslash, a quote or a control character."""
    each = func.json_each(column).table_valued("key", "value")
    return select(each.c.value).where(each.c.key == key).scalar_subquery()


def _operators(key: str, spec: Any) -> list[tuple[str, Any]]:
    """The (operator, value) pairs of one field's condition."""
    if isinstance(spec, Mapping):
        if not spec:
            raise ConfigError(f'where[{_show(key)}]: an empty condition; give {{operator: value}}, e.g. {{">=": 10}}')
        bad = [op for op in spec if op not in _COMPARE + _MEMBER]
        if bad:
            raise ConfigError(
                f"where[{_show(key)}]: unknown operator {_show(bad[0])}; operators are {', '.join(_COMPARE + _MEMBER)}"
            )
        return list(spec.items())
    if isinstance(spec, tuple):
        if len(spec) != 2 or spec[0] not in _COMPARE + _MEMBER:
            raise ConfigError(
                f"where[{_show(key)}]: {_show(spec)} is not an (operator, value) pair; "
                f"operators are {', '.join(_COMPARE + _MEMBER)}"
            )
        return [(spec[0], spec[1])]
    if isinstance(spec, list | set | frozenset):
        return [("in", spec)]
    return [("==", spec)]


def _values(key: str, op: str, value: Any) -> WhereValue | list[WhereValue]:
    if op in _MEMBER:
        if not isinstance(value, list | tuple | set | frozenset):
            raise ConfigError(f"where[{_show(key)}]: {op!r} needs a list of values, got {_show(value)}")
        return [_check_value(key, v) for v in value]
    checked = _check_value(key, value)
    if checked is None and op not in ("==", "!="):
        raise ConfigError(f"where[{_show(key)}]: None can only be compared with == or !=")
    return checked


def _clause(field: ColumnElement[Any], op: str, value: WhereValue | list[WhereValue]) -> ColumnElement[bool]:
    if isinstance(value, list):
        # each value bound with its own type: a plain list is bound with the first one's, and [0.0, ""] then failed
        # converting "" to a float (a 500)
        members = [literal(v) for v in value]
        return field.in_(members) if op == "in" else field.not_in(members)
    if value is None:
        return field.is_(None) if op == "==" else field.is_not(None)
    clause: ColumnElement[bool] = {
        "==": lambda: field == value,
        "!=": lambda: field != value,
        "<": lambda: field < value,
        "<=": lambda: field <= value,
        ">": lambda: field > value,
        ">=": lambda: field >= value,
    }[op]()
    return clause


def _check_value(key: str, value: Any) -> WhereValue:
    if isinstance(value, np.generic):
        value = value.item()
    if value is not None and not isinstance(value, str | int | float | bool):
        raise ConfigError(f"where[{_show(key)}]: {_show(value)} is not a string, number, bool or None")
    if isinstance(value, str) and _broken(value):
        raise ConfigError(f"where[{_show(key)}]: {_show(value)} is not valid Unicode (it holds a lone surrogate)")
    if isinstance(value, bool):
        return int(value)  # json_extract reads true/false as 1/0, and SQLAlchemy refuses `< True`
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ConfigError(
            f"where[{_show(key)}]: {_show(value)} is outside SQLite's 64-bit integers; compare with a float instead"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"where[{_show(key)}]: {value} is not a finite number")
    return value


def _broken(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (JSON's ``"\\ud800"``), which SQLite cannot store or compare."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    return "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def _show(value: Any, limit: int = 60) -> str:
    """``value`` for a message: a container by its kind (its repr may be huge or too deep to print), a scalar cut
    to ``limit`` characters."""
    if isinstance(value, Mapping | list | tuple | set | frozenset):
        return f"{_kind(value)} of {len(value)}"
    if isinstance(value, int) and value.bit_length() > 200:  # repr of an int past 4,300 digits raises
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_WHERE = re.compile(r"\s*(?P<key>.+?)\s*(?P<op>==|!=|<=|>=|=|<|>|\s+not\s+in\s+|\s+in\s+)\s*(?P<value>.*?)\s*\Z")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a value to filter on")  # NaN/Infinity: read as plain text instead


def parse_where(expressions: Sequence[str]) -> dict[str, Any]:
    """``["brand=acme", "price<50", 'color in ["red", "blue"]']`` -> a ``where`` dict for search.

    A value is read as JSON where it parses (numbers, true/false/null, quoted strings, lists),
    else taken as a plain string.
    """
    where: dict[str, dict[str, Any]] = {}
    for text in expressions:
        m = _WHERE.match(text)
        if not m or not m["key"]:
            raise ConfigError(
                f"--where {text!r}: expected FIELD OP VALUE with OP one of = != < <= > >= in, not in "
                "(e.g. --where brand=acme --where 'price<50')"
            )
        op = " ".join(m["op"].split())
        op = "==" if op == "=" else op
        try:
            value = json.loads(m["value"], parse_constant=_no_constant)
        except (json.JSONDecodeError, ValueError, RecursionError):
            value = m["value"]
        if op in ("in", "not in") and not isinstance(value, list):
            raise ConfigError(f'--where {text!r}: {op!r} needs a JSON list, e.g. \'color in ["red", "blue"]\'')
        field = where.setdefault(m["key"], {})
        if op in field:
            raise ConfigError(f"--where: {m['key']} {op} is given twice")
        field[op] = value
    # one condition stays in the plain form (a value, or an (op, value) pair); a range on one field is a dict
    return {
        key: (ops["=="] if list(ops) == ["=="] else next(iter(ops.items()))) if len(ops) == 1 else ops
        for key, ops in where.items()
    }
