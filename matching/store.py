"""SQLite store (SQLAlchemy 2.0 ORM) of titles and metadata, plus a sidecar array of title vectors.

The store's ``row_id`` is the FAISS id and the row of the title in ``vectors.f32``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
from sqlalchemy import Engine, Integer, String, Text, create_engine, event, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from matching.errors import BundleError
from matching.types import IdType

DB_FILE = "store.sqlite"
VECTORS_FILE = "vectors.f32"
CONFIG_FILE = "store.json"
_SQL_BATCH = 900  # stays under SQLite's default limit of bound variables per statement


class Base(DeclarativeBase):
    pass


class TitleRow(Base):
    __tablename__ = "titles"

    row_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    external_id: Mapped[str] = mapped_column(String, unique=True)
    title: Mapped[str] = mapped_column(Text)
    # Exact-title lookups (score_pairs reuses cached vectors) go through this hash, not a text index.
    title_hash: Mapped[int] = mapped_column(Integer, index=True)
    metadata_json: Mapped[str] = mapped_column("metadata", Text, default="{}")


@dataclass(frozen=True, slots=True)
class StoredTitle:
    row_id: int
    external_id: str
    title: str
    metadata: dict[str, Any]


def title_hash(title: str) -> int:
    digest = hashlib.blake2b(title.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


class Store:
    """Rows and vectors of one bundle generation. Open with :meth:`open`, create with :meth:`create`."""

    def __init__(self, directory: Path, engine: Engine, vectors: np.ndarray, id_type: IdType) -> None:
        self.directory = directory
        self.engine = engine
        self.vectors = vectors
        self.id_type = id_type

    # -- creation ----------------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, dim: int) -> StoreWriter:
        """Start a new store in ``directory`` (which must not hold one yet)."""
        return StoreWriter(directory, dim)

    @classmethod
    def open(cls, directory: Path) -> Self:
        config_path = directory / CONFIG_FILE
        db_path = directory / DB_FILE
        vec_path = directory / VECTORS_FILE
        for p in (config_path, db_path, vec_path):
            if not p.is_file():
                raise BundleError(f"bundle store file {str(p)!r} is missing")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        count, dim = int(config["count"]), int(config["dim"])
        expected = count * dim * 4
        if vec_path.stat().st_size != expected:
            raise BundleError(
                f"{str(vec_path)!r} holds {vec_path.stat().st_size} bytes, expected {expected} "
                f"for {count} vectors of dimension {dim}: the file is damaged"
            )
        vectors = np.memmap(vec_path, dtype=np.float32, mode="r", shape=(count, dim))
        return cls(directory, _engine(db_path), vectors, IdType(config["id_type"]))

    def close(self) -> None:
        self.engine.dispose()

    # -- reads ---------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    def get(self, row_ids: Sequence[int]) -> list[StoredTitle]:
        """Rows for ``row_ids``, in the same order (KeyError if one is absent)."""
        found: dict[int, TitleRow] = {}
        wanted = list(dict.fromkeys(int(i) for i in row_ids))
        with Session(self.engine) as session:
            for start in range(0, len(wanted), _SQL_BATCH):
                part = wanted[start : start + _SQL_BATCH]
                for row in session.scalars(select(TitleRow).where(TitleRow.row_id.in_(part))):
                    found[row.row_id] = row
        out = []
        for i in row_ids:
            row = found[int(i)]
            out.append(StoredTitle(row.row_id, row.external_id, row.title, json.loads(row.metadata_json)))
        return out

    def find_titles(self, titles: Sequence[str]) -> list[int | None]:
        """The row id of each exact title text, or ``None`` where the store has no such title."""
        hashes = {title_hash(t): t for t in titles}
        by_text: dict[str, int] = {}
        keys = list(hashes)
        with Session(self.engine) as session:
            for start in range(0, len(keys), _SQL_BATCH):
                part = keys[start : start + _SQL_BATCH]
                stmt = select(TitleRow.row_id, TitleRow.title).where(TitleRow.title_hash.in_(part))
                for row_id, text in session.execute(stmt):
                    by_text.setdefault(text, row_id)
        return [by_text.get(t) for t in titles]

    def external_id(self, raw: str) -> str | int:
        """The id as the user gave it: ``int`` when every id in the catalogue was an integer."""
        return int(raw) if self.id_type is IdType.INT else raw


class StoreWriter:
    """Appends rows and vectors while a bundle is built; :meth:`finish` writes the config."""

    def __init__(self, directory: Path, dim: int) -> None:
        self.directory = directory
        self.dim = dim
        self.count = 0
        db_path = directory / DB_FILE
        if db_path.exists():
            raise BundleError(f"{str(db_path)!r} already exists")
        self.engine = _engine(db_path)
        Base.metadata.create_all(self.engine)
        self._vectors = (directory / VECTORS_FILE).open("wb")

    def append(
        self,
        external_ids: Sequence[str],
        titles: Sequence[str],
        metadata: Iterable[str],
        vectors: np.ndarray,
    ) -> np.ndarray:
        """Add rows (metadata as JSON text) and their vectors; returns the row ids given to them."""
        n = len(external_ids)
        if vectors.shape != (n, self.dim):
            raise ValueError(f"expected vectors of shape {(n, self.dim)}, got {vectors.shape}")
        row_ids = np.arange(self.count, self.count + n, dtype=np.int64)
        records = [
            {
                "row_id": int(r),
                "external_id": e,
                "title": t,
                "title_hash": title_hash(t),
                "metadata_json": m,
            }
            for r, e, t, m in zip(row_ids, external_ids, titles, metadata, strict=True)
        ]
        with Session(self.engine) as session, session.begin():
            session.execute(insert(TitleRow), records)
        self._vectors.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
        self.count += n
        return row_ids

    def finish(self, id_type: IdType) -> None:
        self._vectors.flush()
        self._vectors.close()
        self.engine.dispose()
        config = {"count": self.count, "dim": self.dim, "id_type": id_type.value}
        (self.directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def abort(self) -> None:
        self._vectors.close()
        self.engine.dispose()
