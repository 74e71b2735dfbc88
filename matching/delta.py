"""A generation's changes kept beside its base files, so a change costs what it changes.

``delta.sqlite`` holds the titles added, or given new metadata, since the base files (store, vector index, BM25
postings, field columns) were written, and the base rows it hides (removed, or replaced by its own row). A change
copies this small file, appends to the shared vector file and carries every base file by hard link; readers lay it
over the base store (a SQLite view) and replay it onto the base index, postings and columns as they load them, so
they answer as a generation written whole would. A change that leaves it past :func:`fold_limit` rows
publishes new base files at once (the delta folded in). Store side: :mod:`matching.store`,
:mod:`matching.editors`.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matching.errors import BundleError
from matching.layout import LEXICAL_CONFIG, STORE_DELTA
from matching.lexical import LexicalIndex
from matching.vectors import VectorIndex

# a change that leaves the delta holding or hiding more rows than this (or this share of the base's live titles, if
# more) folds it into new base files at once: readers replay it on every load (1M titles: a load took 0.45 s with a
# delta of 1,000 rows, 0.76 s with 10,000), and a fold rewrites the base files (~2-3 s at 1M)
FOLD_ROWS = 10_000
FOLD_SHARE = 0.02


def fold_limit(base_count: int) -> int:
    """The delta size (rows it holds or hides) past which it is folded into new base files."""
    return max(FOLD_ROWS, int(FOLD_SHARE * base_count))


def read_uri(path: Path) -> str:
    """A read-only SQLite URI for a published file (immutable: SQLite skips locking and change checks)."""
    return f"{write_uri(path)}?mode=ro&immutable=1"


def write_uri(path: Path) -> str:
    """The SQLite URI of a file a writer opens (a connection opened by URI reads the URIs it attaches as URIs, on
    any SQLite build)."""
    return f"file:{urllib.parse.quote(str(path.resolve()))}"


def view_sql(base: str, delta: str) -> str:
    """The temporary view ``titles``: the base schema's rows the delta does not hide, then the delta's own."""
    columns = "row_id, external_id, title, title_hash, metadata"
    return (
        f"CREATE TEMP VIEW titles AS SELECT {columns} FROM {base}.titles "
        f"WHERE row_id NOT IN (SELECT row_id FROM {delta}.shadowed) UNION ALL SELECT {columns} FROM {delta}.titles"
    )


def connect_read_only(db: Path, delta: Path | None) -> sqlite3.Connection:
    """A connection to a published store: ``db`` alone, or with ``delta`` laid over it (queries on ``titles``
    read the view)."""
    conn = sqlite3.connect(read_uri(db), uri=True, check_same_thread=False)
    if delta is not None:
        conn.execute("ATTACH DATABASE ? AS delta", (read_uri(delta),))
        conn.execute(view_sql("main", "delta"))
    return conn


@dataclass(frozen=True)
class Delta:
    """What ``delta.sqlite`` changes in the base files: ``removed`` base rows, ``added`` rows (from ``base_rows``
    on, ascending) with their ``titles``, and the new ``metadata`` (JSON) of each row it holds, added or not."""

    base_rows: int
    removed: np.ndarray
    added: np.ndarray
    titles: list[str]
    metadata: dict[int, str]

    @property
    def updated(self) -> np.ndarray:
        """Base rows still live whose metadata the delta replaces."""
        return np.asarray(sorted(r for r in self.metadata if r < self.base_rows), dtype=np.int64)


def read_delta(directory: Path, config: dict[str, Any]) -> Delta | None:
    """The delta of the store in ``directory`` (``config``: its ``store.json``), or None where it has none."""
    path = directory / STORE_DELTA
    if "base_rows" not in config:
        return None
    if not path.is_file():
        raise BundleError(f"bundle store file {str(path)!r} is missing")
    try:
        conn = sqlite3.connect(read_uri(path), uri=True)
        try:
            rows = conn.execute("SELECT row_id, title, metadata FROM titles ORDER BY row_id").fetchall()
            shadowed = [r for (r,) in conn.execute("SELECT row_id FROM shadowed ORDER BY row_id")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BundleError(f"cannot read {str(path)!r}: {exc}") from None
    base_rows = int(config["base_rows"])
    held = {int(r) for r, _, _ in rows}
    added = [(int(r), str(t)) for r, t, _ in rows if r >= base_rows]
    return Delta(
        base_rows,
        np.asarray([r for r in shadowed if r not in held], dtype=np.int64),
        np.asarray([r for r, _ in added], dtype=np.int64),
        [t for _, t in added],
        {int(r): str(m) for r, _, m in rows},
    )


def load_index(directory: Path, delta: Delta | None, vectors: np.ndarray) -> VectorIndex:
    """The vector index of generation ``directory`` with its delta replayed (``vectors``: the store's)."""
    index = VectorIndex.load(directory)
    if delta is not None:
        if not index.remove(delta.removed):
            raise BundleError(f"the vector index of {str(directory)!r} cannot remove rows, but its delta removes some")
        if len(delta.added):
            index.add(np.asarray(vectors[delta.added], dtype=np.float32), delta.added)
    return index


def load_lexical(directory: Path, delta: Delta | None, rows: int) -> LexicalIndex | None:
    """The BM25 index of generation ``directory`` (None where it has none) with its delta replayed, over ``rows``
    row ids."""
    if not (directory / LEXICAL_CONFIG).is_file():
        return None
    lexical = LexicalIndex.load(directory)
    if delta is not None:
        lexical.remove(delta.removed)
        lexical.add(delta.added, delta.titles)
        lexical.grow(rows)
    return lexical
