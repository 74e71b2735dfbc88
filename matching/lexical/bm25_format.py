"""The saved form of the BM25 lexical index: its format tag, BM25 parameters, and the checks a loaded one must pass."""

from __future__ import annotations

from typing import Any

import numpy as np

from matching.analysis import FOLDS, Analyzer
from matching.errors import ConfigError
from matching.layout import LEXICAL_CONFIG
from matching.lexical.base import BM25Params

FORMAT = "matching.lexical"
FORMAT_VERSION = 1


class DamagedError(Exception):
    """A saved lexical index that fails a check (the caller names the directory)."""


def checked(
    meta: Any, arrays: dict[str, np.ndarray]
) -> tuple[Analyzer, BM25Params, list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The constructor arguments of a saved index, after checking everything a search relies on."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DamagedError(f"{LEXICAL_CONFIG} is not a lexical index (format {FORMAT!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise DamagedError(f"format version {meta.get('version')!r} is not {FORMAT_VERSION}; rebuild the index")
    try:
        analyzer = Analyzer(str(meta.get("analyzer")))
        params = BM25Params(**meta["params"])
    except (ValueError, TypeError, KeyError, ConfigError) as exc:
        raise DamagedError(f"bad analyzer or params: {exc}") from None
    if analyzer == Analyzer.AUTO:
        raise DamagedError("analyzer 'auto' was never resolved")
    fold = meta.get("fold", 1)  # saved before the folding was recorded: the first one
    if fold not in FOLDS or isinstance(fold, bool):
        raise DamagedError(f"case folding {fold!r} is not one this version knows ({FOLDS}); upgrade matching")
    vocab, rows = meta.get("vocab"), meta.get("rows")
    if not isinstance(vocab, list) or not all(isinstance(term, str) for term in vocab) or len(set(vocab)) < len(vocab):
        raise DamagedError("vocab is not a list of distinct strings")
    if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows < np.iinfo(np.int32).max:
        raise DamagedError(f"rows {rows!r} is not a row count")
    expected = {"ptr": np.int64, "post_rows": np.int32, "post_tf": np.uint16, "doc_len": np.int32, "live": np.bool_}
    for name, dtype in expected.items():
        array = arrays.get(name)
        if array is None or array.dtype != dtype or array.ndim != 1:
            raise DamagedError(f"array {name!r} is missing or not 1-d {np.dtype(dtype)}")
    ptr, post_rows, post_tf = arrays["ptr"], arrays["post_rows"], arrays["post_tf"]
    doc_len, live = arrays["doc_len"], arrays["live"]
    if len(ptr) != len(vocab) + 1 or ptr[0] != 0 or ptr[-1] != len(post_rows) or np.any(np.diff(ptr) < 0):
        raise DamagedError("term pointers do not match the vocabulary and postings")
    if len(post_tf) != len(post_rows) or len(doc_len) != rows or len(live) != rows:
        raise DamagedError("array lengths disagree with each other or with rows")
    if len(post_rows) and (post_rows.min() < 0 or post_rows.max() >= rows or post_tf.min() < 1):
        raise DamagedError("a posting names a row outside 0..rows-1 or has tf 0")
    ascending = np.diff(post_rows) > 0
    starts = ptr[1:-1]
    ascending[starts[(starts > 0) & (starts < len(post_rows))] - 1] = True
    if not np.all(ascending) or (len(doc_len) and doc_len.min() < 0):
        raise DamagedError("postings are not ascending by row within a term, or a title length is negative")
    return analyzer, params, vocab, ptr, post_rows, post_tf, doc_len, live, fold
