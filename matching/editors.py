"""The two store editors of a catalogue change, made inside a staging generation: :class:`StoreEditor` (the store
copied whole, any live delta folded into it: the new base) and :class:`DeltaEditor` (the change written into the
generation's delta, :mod:`matching.delta`: the live ``delta.sqlite`` copied, or started, and edited; the base
database only read, through the same view readers use, and carried by hard link with every other base file). Both
hard-link the shared vector file and append to it."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, delete, func, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from matching.checksums import read_span
from matching.delta import read_delta, read_uri, view_sql, write_uri
from matching.errors import BundleError
from matching.fields import parse_metadata
from matching.layout import STORE_DB, STORE_DELTA, VECTORS_FILE
from matching.store import (
    SQL_BATCH,
    TITLES,
    StoredTitle,
    TitleRow,
    append_rows,
    load_fields,
    lookup_rows,
    read_config,
    title_hash,
    writable_engine,
    write_config,
)
from matching.types import IdType


class _Editor:
    """What both editors share: the live store's shape, and its vector file open to append in the staging
    generation."""

    def __init__(self, base: Path, staging: Path) -> None:
        self.config = read_config(base)
        self.directory = staging
        self.dim = self.config["dim"]
        self.rows = self.config["rows"]
        self.id_type = IdType(self.config["id_type"])
        self._vectors = open_vectors(base, staging, self.rows * self.dim * 4)

    def _close_vectors(self) -> None:
        self._vectors.flush()
        os.fsync(self._vectors.fileno())
        self._vectors.close()


def _linked_elsewhere(file: Path, root: Path) -> bool:
    """Whether ``file`` has hard links outside the bundle directory ``root`` (its generations share it)."""
    st = file.stat()
    inside = 0
    for child in root.iterdir():
        try:
            other = (child / VECTORS_FILE).stat()
        except OSError:
            continue
        inside += (other.st_ino, other.st_dev) == (st.st_ino, st.st_dev)
    return st.st_nlink > inside


def _copy_prefix(source: Path, target: Path, size: int) -> None:
    with source.open("rb") as src, target.open("wb") as dst:
        for block in read_span(src, size, 1 << 24):
            dst.write(block)


def open_vectors(base: Path, staging: Path, size: int) -> BinaryIO:
    """The vector file of the live generation ``base`` in ``staging``, open to append after its first ``size``
    bytes: hard-linked (earlier generations read only the prefix they were published with) where nothing outside
    the bundle shares it."""
    if _linked_elsewhere(base / VECTORS_FILE, base.parent):
        # a hard-linked copy of the bundle (cp -al, rsync --link-dest) shares this file: appending to it, or
        # truncating it, would change the other copy; this bundle takes a copy of its own
        _copy_prefix(base / VECTORS_FILE, staging / VECTORS_FILE, size)
    else:
        try:
            os.link(base / VECTORS_FILE, staging / VECTORS_FILE)
        except OSError:
            shutil.copyfile(base / VECTORS_FILE, staging / VECTORS_FILE)
    file = (staging / VECTORS_FILE).open("r+b")
    file.truncate(size)  # drop what a crashed writer appended
    file.seek(0, os.SEEK_END)
    return file


def _fold(db: Path, delta: Path) -> None:
    """Apply the changes ``delta`` holds to the store database ``db`` (a writable copy of its base)."""
    conn = sqlite3.connect(write_uri(db), uri=True)
    try:
        conn.execute("ATTACH DATABASE ? AS delta", (read_uri(delta),))
        with conn:
            conn.execute("DELETE FROM titles WHERE row_id IN (SELECT row_id FROM delta.shadowed)")
            conn.execute("DELETE FROM titles WHERE row_id IN (SELECT row_id FROM delta.titles)")
            conn.execute("INSERT INTO titles SELECT row_id, external_id, title, title_hash, metadata FROM delta.titles")
        conn.execute("DETACH DATABASE delta")
    finally:
        conn.close()


class StoreEditor(_Editor):
    """A writable copy of a published store: the database copied (the live delta folded into it), the field columns
    rewritten."""

    def __init__(self, base: Path, staging: Path) -> None:
        super().__init__(base, staging)
        shutil.copyfile(base / STORE_DB, staging / STORE_DB)
        delta = read_delta(base, self.config)
        if delta is not None:  # fold the live delta into the copy: it becomes the new base
            _fold(staging / STORE_DB, base / STORE_DELTA)
        self.engine = writable_engine(staging / STORE_DB)
        self.fields = load_fields(base, delta, self.rows)

    def lookup(self, external_ids: Sequence[str]) -> dict[str, StoredTitle]:
        return lookup_rows(self.engine, external_ids)

    def delete(self, row_ids: Sequence[int]) -> None:
        ids = [int(i) for i in row_ids]
        with Session(self.engine) as session, session.begin():
            for start in range(0, len(ids), SQL_BATCH):
                session.execute(delete(TitleRow).where(TitleRow.row_id.in_(ids[start : start + SQL_BATCH])))
        if self.fields is not None:
            self.fields.remove(np.asarray(ids, dtype=np.int64))

    def update_metadata(self, changes: Mapping[int, str]) -> None:
        with Session(self.engine) as session, session.begin():
            for row_id, meta in changes.items():
                session.execute(update(TitleRow).where(TitleRow.row_id == row_id).values(metadata_json=meta))
        if self.fields is not None and changes:
            self.fields.update(np.fromiter(changes, dtype=np.int64), [parse_metadata(m) for m in changes.values()])

    def append(
        self, external_ids: Sequence[str], titles: Sequence[str], metadata: Iterable[str], vectors: np.ndarray
    ) -> np.ndarray:
        """Add rows (metadata as JSON text) and their vectors under fresh row ids, which are returned."""
        metadata = list(metadata)
        row_ids = append_rows(self.engine, self._vectors, self.rows, self.dim, external_ids, titles, metadata, vectors)
        self.rows += len(row_ids)
        if self.fields is not None:
            self.fields.add(row_ids, [parse_metadata(m) for m in metadata])
        return row_ids

    def finish(self, id_type: IdType | None = None) -> int:
        """Write the store's config; returns the number of live rows."""
        self._close_vectors()
        with Session(self.engine) as session:
            count = int(session.scalar(select(func.count()).select_from(TitleRow)) or 0)
        self.engine.dispose()
        self.id_type = id_type or self.id_type
        if self.fields is not None:
            self.fields.save(self.directory)
        write_config(self.directory, count=count, rows=self.rows, dim=self.dim, id_type=self.id_type)
        return count

    def abort(self) -> None:
        self._vectors.close()
        self.engine.dispose()


_DELTA = MetaData(schema="main")
# the delta's own tables, named with their schema: an unqualified ``titles`` is the view over base and delta
DELTA_TITLES = TITLES.to_metadata(_DELTA)
SHADOWED = Table("shadowed", _DELTA, Column("row_id", Integer, primary_key=True, autoincrement=False))


def delta_size(live: Path) -> int:
    """Rows the live generation's delta holds or hides (0 where it has none)."""
    path = live / STORE_DELTA
    if not path.is_file() or "base_rows" not in read_config(live):
        return 0
    conn = sqlite3.connect(read_uri(path), uri=True)
    try:
        held = conn.execute("SELECT count(*) FROM titles").fetchone()[0]
        hidden = conn.execute("SELECT count(*) FROM shadowed").fetchone()[0]
    finally:
        conn.close()
    return int(held) + int(hidden)


def _delta_engine(delta: Path, base_db: Path) -> Engine:
    """The writable delta ``delta`` with the base database ``base_db`` attached read-only, and the view."""

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(write_uri(delta), uri=True, check_same_thread=False)
        conn.execute("ATTACH DATABASE ? AS base", (read_uri(base_db),))
        conn.execute(view_sql("base", "main"))
        return conn

    return create_engine("sqlite://", creator=connect, poolclass=StaticPool)


class DeltaEditor(_Editor):
    """:class:`StoreEditor`'s interface, writing the change into the staging generation's delta."""

    def __init__(self, base: Path, staging: Path) -> None:
        super().__init__(base, staging)
        config = self.config
        self.base_rows = int(config.get("base_rows", config["rows"]))
        self.base_count = int(config.get("base_count", config["count"]))
        if "base_rows" in config:
            shutil.copyfile(base / STORE_DELTA, staging / STORE_DELTA)
        self.base_db = base / STORE_DB
        self.engine = _delta_engine(staging / STORE_DELTA, self.base_db)
        if "base_rows" not in config:
            with self.engine.begin() as conn:
                _DELTA.create_all(conn)

    def lookup(self, external_ids: Sequence[str]) -> dict[str, StoredTitle]:
        return lookup_rows(self.engine, external_ids)

    def delete(self, row_ids: Sequence[int]) -> None:
        ids = [int(i) for i in row_ids]
        hidden = [{"row_id": i} for i in ids if i < self.base_rows]
        with self.engine.begin() as conn:
            for start in range(0, len(ids), SQL_BATCH):
                part = ids[start : start + SQL_BATCH]
                conn.execute(DELTA_TITLES.delete().where(DELTA_TITLES.c.row_id.in_(part)))
            if hidden:
                conn.execute(SHADOWED.insert().prefix_with("OR IGNORE"), hidden)

    def update_metadata(self, changes: Mapping[int, str]) -> None:
        read = text("SELECT external_id, title, title_hash FROM base.titles WHERE row_id = :row_id")
        with self.engine.begin() as conn:
            for row_id, meta in changes.items():
                done = conn.execute(
                    DELTA_TITLES.update().where(DELTA_TITLES.c.row_id == row_id).values(metadata=meta)
                ).rowcount
                if done:
                    continue
                # a base row: the delta takes a copy with the new metadata, and hides the base's. The copy is hashed
                # into the new manifest while the base store is not read whole: its title must still be the one its
                # hash was taken of, or damage would be blessed
                external_id, title, stored_hash = conn.execute(read, {"row_id": row_id}).one()
                if title_hash(title) != stored_hash:
                    raise BundleError(
                        f"bundle file {str(self.base_db)!r} is damaged: row {row_id}'s title does not match its "
                        "hash; nothing was published. Restore the bundle from a copy, or rebuild it"
                    )
                record = {"row_id": row_id, "external_id": external_id, "title": title, "title_hash": stored_hash}
                conn.execute(DELTA_TITLES.insert(), [record | {"metadata": meta}])
                conn.execute(SHADOWED.insert().prefix_with("OR IGNORE"), [{"row_id": row_id}])

    def append(
        self, external_ids: Sequence[str], titles: Sequence[str], metadata: Iterable[str], vectors: np.ndarray
    ) -> np.ndarray:
        """Add rows (metadata as JSON text) and their vectors under fresh row ids, which are returned."""
        row_ids = append_rows(
            self.engine, self._vectors, self.rows, self.dim, external_ids, titles, metadata, vectors, DELTA_TITLES
        )
        self.rows += len(row_ids)
        return row_ids

    def finish(self, id_type: IdType | None = None) -> int:
        """Write the store's config; returns the number of live rows."""
        self._close_vectors()
        with self.engine.connect() as conn:
            held = int(conn.execute(text("SELECT count(*) FROM main.titles")).scalar_one())
            hidden = int(conn.execute(text("SELECT count(*) FROM main.shadowed")).scalar_one())
        self.engine.dispose()
        self.id_type = id_type or self.id_type
        count = self.base_count - hidden + held
        write_config(
            self.directory,
            count=count,
            rows=self.rows,
            dim=self.dim,
            id_type=self.id_type,
            base_rows=self.base_rows,
            base_count=self.base_count,
        )
        return count

    def abort(self) -> None:
        self._vectors.close()
        self.engine.dispose()
