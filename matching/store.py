"""SQLite store (SQLAlchemy 2.0 ORM) of titles and metadata, plus a sidecar array of title vectors.

The store's ``row_id`` is the FAISS id and the row of the title in ``vectors.f32``. Row ids are never
reused: a removed title leaves a dead row in the (append-only) vector file until the bundle is compacted.
A published generation's database is immutable and opened read-only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, Self

import numpy as np
import pandas as pd
from sqlalchemy import (
    Engine,
    Index,
    Integer,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import QueuePool
from sqlalchemy.schema import CreateIndex, CreateTable

from matching.checksums import BlockHasher
from matching.delta import Delta, connect_read_only, read_delta
from matching.errors import BundleError
from matching.field_query import evaluate
from matching.fields import FieldBuilder, FieldIndex, FieldSpec, parse_metadata
from matching.filters import Condition, conditions, where_clauses
from matching.filters import Where as Where
from matching.filters import parse_where as parse_where
from matching.ingest import metadata_json
from matching.layout import STORE_CONFIG, STORE_DB, STORE_DELTA, VECTORS_FILE
from matching.types import IdType

SQL_BATCH = 900  # stays under SQLite's default limit of bound variables per statement


class Base(DeclarativeBase):
    pass


class TitleRow(Base):
    __tablename__ = "titles"
    # a named index, not a column constraint, so that a build can create it after its last row (StoreWriter)
    __table_args__ = (Index("ix_titles_external_id", "external_id", unique=True),)

    row_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    external_id: Mapped[str] = mapped_column(String)
    title: Mapped[str] = mapped_column(Text)
    # Exact-title lookups (score_pairs reuses cached vectors) go through this hash, not a text index.
    title_hash: Mapped[int] = mapped_column(Integer, index=True)
    metadata_json: Mapped[str] = mapped_column("metadata", Text, default="{}")


TITLES: Table = TitleRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class StoredTitle:
    row_id: int
    external_id: str
    title: str
    metadata: dict[str, Any]


def title_hash(title: str) -> int:
    digest = hashlib.blake2b(title.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _read_only_engine(path: Path, delta: Path | None = None) -> Engine:
    """The published store ``path`` (with the ``delta`` file over it, if given), read-only. The file never
    changes while published, so SQLite skips locking and change checks."""
    # a QueuePool: the "sqlite://" URL alone would pick SingletonThreadPool, which closes connections in use
    # once more than five threads share one store
    return create_engine(
        "sqlite://",
        creator=lambda: connect_read_only(path, delta),
        poolclass=QueuePool,
        pool_size=4,
        max_overflow=-1,
    )


def writable_engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


class Store:
    """Rows and vectors of one bundle generation. Open with :meth:`open`, create with :meth:`create`."""

    def __init__(
        self,
        directory: Path,
        engine: Engine,
        vectors: np.ndarray,
        id_type: IdType,
        count: int,
    ) -> None:
        self.directory = directory
        self.engine = engine
        self.vectors = vectors  # every row ever added, dead ones included; index it with row ids
        self.id_type = id_type
        self._count = count

    # -- creation ----------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, directory: Path, dim: int, fields: FieldSpec | None = None, *, hash_blocks: bool = False
    ) -> StoreWriter:
        """Start a new store in ``directory`` (which must not hold one yet), indexing the metadata fields ``fields``
        chooses (default: automatically). ``hash_blocks``: the vector file's whole blocks are hashed as they are
        written (``StoreWriter.vector_blocks``, for the manifest)."""
        return StoreWriter(directory, dim, fields or FieldSpec(), hash_blocks=hash_blocks)

    @classmethod
    def open(cls, directory: Path) -> Self:
        config_path = directory / STORE_CONFIG
        db_path = directory / STORE_DB
        vec_path = directory / VECTORS_FILE
        for p in (config_path, db_path, vec_path):
            if not p.is_file():
                raise BundleError(f"bundle store file {str(p)!r} is missing")
        config = read_config(directory)
        count, rows, dim = config["count"], config["rows"], config["dim"]
        expected, size = rows * dim * 4, vec_path.stat().st_size
        # the file is append-only and shared with later generations: it may be longer than this one uses
        if size < expected:
            raise BundleError(
                f"{str(vec_path)!r} holds {size} bytes, expected {expected} "
                f"for {rows} vectors of dimension {dim}: the file is damaged"
            )
        vectors: np.ndarray
        if rows:
            vectors = np.memmap(vec_path, dtype=np.float32, mode="r", shape=(rows, dim))
            # rows are read at random (candidates of a query): without this, every page fault maps a whole
            # read-ahead window, and a few thousand scattered reads make most of the file resident
            mapping = getattr(vectors, "_mmap", None)
            if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
                mapping.madvise(mmap.MADV_RANDOM)
        else:
            vectors = np.empty((0, dim), dtype=np.float32)
        engine = _read_only_engine(db_path, directory / STORE_DELTA if "base_rows" in config else None)
        return cls(directory, engine, vectors, IdType(config["id_type"]), count)

    def close(self) -> None:
        self.engine.dispose()

    @functools.cached_property
    def delta(self) -> Delta | None:
        """The changes laid over the base files (:mod:`matching.delta`; None where there are none), read on first
        use: a change reads the store's rows through the view alone."""
        return read_delta(self.directory, read_config(self.directory))

    @functools.cached_property
    def fields(self) -> FieldIndex | None:
        """The indexed metadata fields, read on first use (the changes and build steps that open a store without
        filtering do not read them: 31 ms at 1M titles); None for a store written before fields were indexed (SQL
        answers every where there)."""
        fields = load_fields(self.directory, self.delta, len(self.vectors))
        if fields is not None and fields.rows != len(self.vectors):
            raise BundleError(
                f"the field index in {str(self.directory)!r} covers {fields.rows} rows, the store {len(self.vectors)}"
            )
        return fields

    # -- reads ---------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Live titles (rows of the vector file that were removed are not counted)."""
        return self._count

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def live_ids(self) -> np.ndarray:
        """Row ids of every live title, ascending."""
        with Session(self.engine) as session:
            ids = session.scalars(select(TitleRow.row_id).order_by(TitleRow.row_id)).all()
        return np.asarray(ids, dtype=np.int64)

    def rows(self, batch: int = 10_000) -> Iterator[list[StoredTitle]]:
        """Every live row in row-id order, in batches."""
        last = -1
        while True:
            with Session(self.engine) as session:
                stmt = select(TitleRow).where(TitleRow.row_id > last).order_by(TitleRow.row_id).limit(batch)
                part = [_stored(r) for r in session.scalars(stmt)]
            if not part:
                return
            yield part
            last = part[-1].row_id

    def titles(self, batch: int = 50_000) -> Iterator[list[tuple[int, str]]]:
        """Every live (row id, title) in row-id order, in batches (no metadata: the lexical index reads these)."""
        last = -1
        while True:
            with Session(self.engine) as session:
                stmt = select(TitleRow.row_id, TitleRow.title).where(TitleRow.row_id > last)
                part = [(int(r), str(t)) for r, t in session.execute(stmt.order_by(TitleRow.row_id).limit(batch))]
            if not part:
                return
            yield part
            last = part[-1][0]

    def filter_ids(self, where: Where) -> np.ndarray:
        """Row ids (ascending) whose metadata satisfy every condition of ``where``: conditions on indexed fields
        from their columns, the others by SQL over the JSON metadata (values are bound parameters)."""
        return np.flatnonzero(self.filter_mask(where))

    def filter_mask(self, where: Where) -> np.ndarray:
        """:meth:`filter_ids` as a boolean mask over row ids."""
        checked = conditions(where)
        mask, rest = evaluate(self.fields, checked) if self.fields is not None else (None, checked)
        if mask is not None and not rest:
            return mask
        ids = self.sql_filter_ids(rest)
        if mask is None:
            mask = np.zeros(len(self.vectors), np.bool_)
            mask[ids] = True
            return mask
        keep = np.zeros(len(mask), np.bool_)
        keep[ids] = True
        return mask & keep

    def sql_filter_ids(self, where: Where | list[Condition]) -> np.ndarray:
        """Row ids (ascending) whose JSON metadata satisfy ``where`` (a dict, or checked conditions), by SQL alone."""
        if isinstance(where, list):
            where = _as_where(where)
        stmt = select(TitleRow.row_id).where(*where_clauses(TitleRow.metadata_json, where)).order_by(TitleRow.row_id)
        with Session(self.engine) as session:
            ids = session.scalars(stmt).all()
        return np.asarray(ids, dtype=np.int64)

    def metadata_keys(self, sample: int = 10_000) -> list[str]:
        """The metadata field names of the first ``sample`` live titles, sorted (what a search page offers)."""
        inner = select(TitleRow.metadata_json.label("m")).order_by(TitleRow.row_id).limit(sample).subquery()
        each = func.json_each(inner.c.m).table_valued("key")
        with Session(self.engine) as session:
            keys = session.scalars(select(each.c.key).select_from(inner).join(each, true()).distinct()).all()
        return sorted(str(k) for k in keys)

    def get(self, row_ids: Sequence[int]) -> list[StoredTitle]:
        """Rows for ``row_ids``, in the same order (KeyError if one is absent)."""
        found: dict[int, tuple[str, str, str]] = {}
        wanted = list(dict.fromkeys(int(i) for i in row_ids))
        # the statement as SQL text, not built and compiled as a select() per call: every search reads its hits
        # here (10 rows of the 1M bundle: 0.86 ms with select(...).where(in_), of a ~9 ms hybrid search)
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), SQL_BATCH):
                part = wanted[start : start + SQL_BATCH]
                for row_id, external_id, title, meta in conn.exec_driver_sql(_get_sql(len(part)), tuple(part)):
                    found[row_id] = (external_id, title, meta)
        out = []
        for i in row_ids:  # a StoredTitle (and metadata dict) of its own for each id asked for, repeats included
            external_id, title, meta = found[int(i)]
            out.append(StoredTitle(int(i), external_id, title, _metadata(meta, int(i))))
        return out

    def lookup(self, external_ids: Sequence[str]) -> dict[str, StoredTitle]:
        """The stored rows of those external ids that exist."""
        return lookup_rows(self.engine, external_ids)

    def find_titles(self, titles: Sequence[str]) -> list[int | None]:
        """The row id of each exact title text, or ``None`` where the store has no such title."""
        hashes = {title_hash(t): t for t in titles}
        by_text: dict[str, int] = {}
        keys = list(hashes)
        with Session(self.engine) as session:
            for start in range(0, len(keys), SQL_BATCH):
                part = keys[start : start + SQL_BATCH]
                stmt = select(TitleRow.row_id, TitleRow.title).where(TitleRow.title_hash.in_(part))
                for row_id, text in session.execute(stmt):
                    if by_text.get(text, row_id) >= row_id:  # a title stored twice: its first row, as ever
                        by_text[text] = row_id
        return [by_text.get(t) for t in titles]

    def frame(self) -> pd.DataFrame:
        """Every live title as a DataFrame: ``id``, ``title`` and one column per metadata field."""
        records = [
            {**r.metadata, "id": self.external_id(r.external_id), "title": r.title}
            for rows in self.rows()
            for r in rows
        ]
        frame = pd.DataFrame.from_records(records)
        if frame.empty:
            return pd.DataFrame({"id": [], "title": []})
        for column in frame.columns:
            # pandas makes floats of integers beside a gap or above 2**53: keep such a column as Python values
            values = [r.get(column) for r in records]
            ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
            if ints and ((len(ints) < len(values) and None in values) or max(abs(v) for v in ints) > 2**53):
                frame[column] = pd.Series(values, dtype=object)
        return frame[["id", "title", *[c for c in frame.columns if c not in ("id", "title")]]]

    def external_id(self, raw: str) -> str | int:
        """The id as the user gave it: ``int`` when every id in the catalogue was an integer."""
        return int(raw) if self.id_type is IdType.INT else raw


def _as_where(checked: list[Condition]) -> dict[str, dict[str, Any]]:
    """Checked (field, operator, value) conditions as a ``where`` again: ``{field: {operator: value}}``."""
    where: dict[str, dict[str, Any]] = {}
    for key, op, value in checked:
        where.setdefault(key, {})[op] = value
    return where


def _stored(row: TitleRow) -> StoredTitle:
    return StoredTitle(row.row_id, row.external_id, row.title, _metadata(row.metadata_json, row.row_id))


@functools.lru_cache(maxsize=64)
def _get_sql(n: int) -> str:
    """``Store.get``'s statement for ``n`` row ids (the store's columns, under the names ``TitleRow`` maps)."""
    return f"SELECT row_id, external_id, title, metadata FROM {TITLES.name} WHERE row_id IN ({', '.join('?' * n)})"


def _metadata(text: str, row_id: int) -> dict[str, Any]:
    """A stored row's metadata; text that is not the JSON object it was written as is a damaged store."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise BundleError(
            f"the store's row {row_id} holds metadata that is not a JSON object ({text[:40]!r}): the bundle is "
            "damaged; restore it from a copy, or rebuild it"
        )
    return value


def read_config(directory: Path) -> dict[str, Any]:
    """``count`` (live rows), ``rows`` (vectors in the file), ``dim`` and ``id_type`` of a store."""
    path = directory / STORE_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        count, dim = int(config["count"]), int(config["dim"])
        rows, id_type = int(config.get("rows", count)), IdType(config["id_type"])
        if not (0 <= count <= rows and 1 <= dim <= 65_536):
            raise ValueError(f"count {count}, rows {rows}, dim {dim} do not describe a store")
        out: dict[str, Any] = {"count": count, "rows": rows, "dim": dim, "id_type": id_type.value}
        if "base_rows" in config:  # a delta lies over base files of this many rows and live titles
            base_rows, base_count = int(config["base_rows"]), int(config["base_count"])
            if not (0 <= base_count <= base_rows <= rows):
                raise ValueError(f"base rows {base_rows}, base count {base_count} do not describe a store's base")
            out |= {"base_rows": base_rows, "base_count": base_count}
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"cannot read store config {str(path)!r}: {exc}") from None


def write_config(directory: Path, *, count: int, rows: int, dim: int, id_type: IdType, **base: int) -> None:
    """Write ``store.json`` (``base``: ``base_rows`` and ``base_count`` of the base files a delta lies over)."""
    config = {"count": count, "rows": rows, "dim": dim, "id_type": id_type.value, **base}
    (directory / STORE_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_fields(directory: Path, delta: Delta | None, rows: int) -> FieldIndex | None:
    """The field columns of the store in ``directory`` with its ``delta`` replayed, over ``rows`` row ids."""
    fields = FieldIndex.load(directory)
    if fields is None or delta is None:
        return fields
    fields.remove(delta.removed)
    updated = delta.updated
    fields.update(updated, [parse_metadata(delta.metadata[int(r)]) for r in updated])
    fields.add(delta.added, [parse_metadata(delta.metadata[int(r)]) for r in delta.added])
    fields.grow(rows)
    return fields


def lookup_rows(engine: Engine, external_ids: Sequence[str]) -> dict[str, StoredTitle]:
    out: dict[str, StoredTitle] = {}
    wanted = list(dict.fromkeys(external_ids))
    with Session(engine) as session:
        for start in range(0, len(wanted), SQL_BATCH):
            part = wanted[start : start + SQL_BATCH]
            for row in session.scalars(select(TitleRow).where(TitleRow.external_id.in_(part))):
                out[row.external_id] = _stored(row)
    return out


class VectorSink(Protocol):
    """Where :func:`append_rows` writes the vectors' bytes: a file opened for appending."""

    def write(self, data: bytes, /) -> int: ...


class _HashedFile:
    """A new vector file whose every write is also handed to a :class:`BlockHasher`."""

    def __init__(self, file: BinaryIO, hasher: BlockHasher) -> None:
        self.file, self.hasher = file, hasher

    def write(self, data: bytes, /) -> int:
        written = self.file.write(data)
        self.hasher.write(data)
        return written


def append_rows(
    engine: Engine,
    vector_file: VectorSink,
    first_row: int,
    dim: int,
    external_ids: Sequence[str],
    titles: Sequence[str],
    metadata: Iterable[str],
    vectors: np.ndarray,
    table: Table = TITLES,
) -> np.ndarray:
    """Insert rows under row ids from ``first_row`` on (into ``table``) and append their vectors to
    ``vector_file``."""
    n = len(external_ids)
    if vectors.shape != (n, dim):
        raise ValueError(f"expected vectors of shape {(n, dim)}, got {vectors.shape}")
    row_ids = np.arange(first_row, first_row + n, dtype=np.int64)
    if n:  # (an empty executemany is an error)
        _insert(engine, row_ids, external_ids, titles, metadata, table)
    vector_file.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    return row_ids


def _insert(
    engine: Engine,
    row_ids: np.ndarray,
    external_ids: Sequence[str],
    titles: Sequence[str],
    metadata: Iterable[str],
    table: Table = TITLES,
) -> None:
    columns: dict[str, Sequence[Any]] = {
        "row_id": row_ids.tolist(),
        "external_id": external_ids,
        "title": titles,
        "title_hash": [title_hash(t) for t in titles],
        "metadata": list(metadata),
    }
    # one tuple a row, executed as it is: insert() with a dict a row spent as long preparing the parameters as
    # SQLite took to insert them (200k generated titles, per 1M: 7.5 s against 3.9 s). Placeholders: table order.
    statement = str(insert(table).compile(dialect=engine.dialect, column_keys=list(columns)))
    rows = list(zip(*(columns[c.name] for c in table.columns), strict=True))
    with engine.begin() as conn:
        conn.exec_driver_sql(statement, rows)


class StoreWriter:
    """Appends rows and vectors while a bundle is built; :meth:`finish` writes the config."""

    def __init__(self, directory: Path, dim: int, fields: FieldSpec, *, hash_blocks: bool = False) -> None:
        self.directory = directory
        self.dim = dim
        self.count = 0
        self.fields = FieldBuilder(fields)
        db_path = directory / STORE_DB
        if db_path.exists():
            raise BundleError(f"{str(db_path)!r} already exists")
        self.engine = writable_engine(db_path)
        # the table now, its indexes once the rows are in: kept up row by row, the id and title-hash indexes made
        # inserting 1M generated titles take 6.3 s; built at the end, 2.4 s (0.6 s of it the indexes)
        with self.engine.begin() as conn:
            conn.execute(CreateTable(TITLES))
        self._file = (directory / VECTORS_FILE).open("wb")
        self._hasher = BlockHasher() if hash_blocks else None  # blocks of checksums.BLOCK_BYTES, as a new file takes
        self._vectors: VectorSink = self._file if self._hasher is None else _HashedFile(self._file, self._hasher)
        # with hash_blocks, after finish: the digests of the vector file's whole blocks of BLOCK_BYTES
        self.vector_blocks: list[str] = []

    def append(
        self,
        external_ids: Sequence[str],
        titles: Sequence[str],
        metadata: Iterable[str],
        vectors: np.ndarray,
        parsed: Sequence[Mapping[str, Any]] | None = None,
    ) -> np.ndarray:
        """Add rows (metadata as JSON text) and their vectors; returns the row ids given to them. ``parsed``: the
        same metadata as the dicts the JSON was written from, where the caller has them (not parsed again)."""
        metadata = list(metadata)
        row_ids = append_rows(self.engine, self._vectors, self.count, self.dim, external_ids, titles, metadata, vectors)
        self.count += len(row_ids)
        self.fields.add(row_ids, parsed if parsed is not None else [parse_metadata(m) for m in metadata])
        return row_ids

    def copy_rows(self, source: Store, rows: Sequence[StoredTitle]) -> np.ndarray:
        """Append rows of another store with their stored vectors (no re-encoding); new row ids are returned."""
        return self.append(
            [r.external_id for r in rows],
            [r.title for r in rows],
            [metadata_json(r.metadata) for r in rows],
            np.asarray(source.vectors[[r.row_id for r in rows]]),
            [r.metadata for r in rows],
        )

    def finish(self, id_type: IdType) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
            if self._hasher is not None:
                self._hasher.close()
        if self._hasher is not None:
            self.vector_blocks = self._hasher.digests()
        with self.engine.begin() as conn:  # a repeated id fails here (IntegrityError), as it did on insert
            for index in sorted(TITLES.indexes, key=lambda i: str(i.name)):
                conn.execute(CreateIndex(index))
        self.engine.dispose()
        FieldIndex.from_builder(self.fields, self.count).save(self.directory)
        write_config(self.directory, count=self.count, rows=self.count, dim=self.dim, id_type=id_type)

    def abort(self) -> None:
        """Let go of the files and the hasher's thread (a failed build; also after :meth:`finish`)."""
        if self._hasher is not None:
            self._hasher.close()
        self._file.close()
        self.engine.dispose()
