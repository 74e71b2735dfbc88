"""The store editor of a change kept as a delta (:mod:`matching.delta`): the live generation's ``delta.sqlite`` is
copied into the staging generation (or started there) and edited; the base database is only read, through the same
view readers use, and carried across by hard link with every other base file."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, text
from sqlalchemy.pool import StaticPool

from matching.delta import read_uri, view_sql
from matching.layout import STORE_DB, STORE_DELTA
from matching.store import TITLES, StoredTitle, append_rows, lookup_rows, open_vectors, read_config, write_config
from matching.types import IdType

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
        conn = sqlite3.connect(delta, check_same_thread=False)
        conn.execute("ATTACH DATABASE ? AS base", (read_uri(base_db),))
        conn.execute(view_sql("base", "main"))
        return conn

    return create_engine("sqlite://", creator=connect, poolclass=StaticPool)


class DeltaEditor:
    """:class:`matching.store.StoreEditor`'s interface, writing the change into the staging generation's delta."""

    def __init__(self, base: Path, staging: Path) -> None:
        config = read_config(base)
        self.directory = staging
        self.dim = config["dim"]
        self.rows = config["rows"]
        self.id_type = IdType(config["id_type"])
        self.base_rows = int(config.get("base_rows", config["rows"]))
        self.base_count = int(config.get("base_count", config["count"]))
        if "base_rows" in config:
            shutil.copyfile(base / STORE_DELTA, staging / STORE_DELTA)
        self._vectors = open_vectors(base, staging, self.rows * self.dim * 4)
        self.engine = _delta_engine(staging / STORE_DELTA, base / STORE_DB)
        if "base_rows" not in config:
            with self.engine.begin() as conn:
                _DELTA.create_all(conn)

    def lookup(self, external_ids: Sequence[str]) -> dict[str, StoredTitle]:
        return lookup_rows(self.engine, external_ids)

    def delete(self, row_ids: Sequence[int]) -> None:
        ids = [int(i) for i in row_ids]
        hidden = [{"row_id": i} for i in ids if i < self.base_rows]
        with self.engine.begin() as conn:
            for start in range(0, len(ids), 900):
                part = ids[start : start + 900]
                conn.execute(DELTA_TITLES.delete().where(DELTA_TITLES.c.row_id.in_(part)))
            if hidden:
                conn.execute(SHADOWED.insert().prefix_with("OR IGNORE"), hidden)

    def update_metadata(self, changes: Mapping[int, str]) -> None:
        copy = text(
            "INSERT INTO main.titles SELECT row_id, external_id, title, title_hash, :meta FROM base.titles "
            "WHERE row_id = :row_id"
        )
        with self.engine.begin() as conn:
            for row_id, meta in changes.items():
                done = conn.execute(
                    DELTA_TITLES.update().where(DELTA_TITLES.c.row_id == row_id).values(metadata=meta)
                ).rowcount
                if not done:  # a base row: the delta takes a copy with the new metadata, and hides the base's
                    conn.execute(copy, {"meta": meta, "row_id": row_id})
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
        self._vectors.flush()
        os.fsync(self._vectors.fileno())
        self._vectors.close()
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
