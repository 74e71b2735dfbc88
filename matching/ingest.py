"""The one place user tables are read: CSV/TSV/JSONL files or DataFrames, in validated chunks."""

from __future__ import annotations

import bz2
import contextlib
import csv
import datetime
import decimal
import gzip
import json
import lzma
import math
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from matching.errors import BadRowError, DuplicateIdError, InputFileError, SchemaError
from matching.types import IdType

_INT_ID = re.compile(r"-?(0|[1-9][0-9]*)\Z")
_TAB_SUFFIXES = {".tsv", ".tab", ".txt"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".zip", ".xz", ".zst"}
DEFAULT_CHUNKSIZE = 20_000
_EXACT = 2.0**53  # floats at or above this cannot tell neighbouring whole numbers apart
_NOT_TEXT = (list, tuple, dict, set, np.ndarray, bytes, bytearray)  # a cell no id or title is made of


@dataclass
class Chunk:
    """Validated rows: canonical string ids, titles, metadata dicts and their 1-based row numbers."""

    ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Encoded:
    """Validated rows with their vectors (metadata as JSON text), in catalogue order: what a build writes."""

    ids: list[str]
    titles: list[str]
    metadata: list[str]
    vectors: np.ndarray
    parsed: list[dict[str, Any]] | None = None  # the metadata as the dicts its JSON was written from, if known


@contextlib.contextmanager
def reading(path: Path, encoding: str = "utf-8") -> Iterator[None]:
    """Turn the ways reading a user table can fail into typed errors that name the file and the fix."""
    name = repr(str(path))
    try:
        yield
    except UnicodeDecodeError as exc:
        where = _locate_decode_error(path, encoding)  # exc.start counts from pandas' buffer, not the file
        at = f" on line {where[0]}, byte {where[1]}" if where else ""
        raise InputFileError(
            f"{name} is not valid {encoding} text ({exc.reason}{at}); "
            "re-save it as UTF-8 or pass its encoding (encoding='latin-1' / --encoding latin-1)"
        ) from None
    except LookupError:
        raise InputFileError(f"unknown text encoding {encoding!r} for {name}; try 'utf-8' or 'latin-1'") from None
    except PermissionError:
        raise InputFileError(
            f"no permission to read {name}; make it and its folders readable (chmod u+r) or copy it elsewhere"
        ) from None
    except pd.errors.EmptyDataError:
        raise InputFileError(f"{name} is empty: it needs a header row and at least one row") from None
    except pd.errors.ParserError as exc:
        raise SchemaError(
            f"{name} is not a well-formed table: {str(exc).strip()}. Every row needs as many fields as the "
            'header; quote a field that holds the separator, a quote or a newline ("like ""this"", here")'
        ) from None
    except (EOFError, zlib.error, gzip.BadGzipFile, zipfile.BadZipFile) as exc:
        raise InputFileError(f"{name} is a damaged or truncated compressed file ({exc})") from None
    except ValueError as exc:  # read_json reports bad JSON lines this way
        if file_format(path) == "jsonl":
            raise SchemaError(f"{name} is not valid JSON Lines: {exc}") from None
        raise


_OPENERS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _locate_decode_error(path: Path, encoding: str) -> tuple[int, int] | None:
    """The 1-based line and the byte offset (in the decompressed text) of the first undecodable line.

    ``None`` where that cannot be told: an encoding in which a newline is not the single byte 0x0A
    (UTF-16/32), a zip or zstd archive, or a file that cannot be read again.
    """
    try:
        if "\n".encode(encoding) != b"\n":
            return None
        suffix = path.suffix.lower()
        if suffix in _COMPRESSION_SUFFIXES and suffix not in _OPENERS:
            return None
        opener: Callable[..., Any] = _OPENERS.get(suffix, open)
        offset = 0
        with opener(path, "rb") as fh:
            for number, line in enumerate(fh, start=1):
                try:
                    line.decode(encoding)
                except UnicodeDecodeError as exc:
                    return number, offset + exc.start
                offset += len(line)
    except (LookupError, OSError, EOFError, zlib.error, lzma.LZMAError):
        return None
    return None


def file_format(path: Path) -> str:
    """'csv', 'tsv', 'jsonl' or 'parquet', from the suffix (a compression suffix is looked through)."""
    last = _table_suffix(path)
    if last in _TAB_SUFFIXES:
        return "tsv"
    if last in _JSONL_SUFFIXES:
        return "jsonl"
    if last in _PARQUET_SUFFIXES:
        return "parquet"
    return "csv"


def catalogue_files(source: str | Path) -> list[Path]:
    """The files of a catalogue source, in the order they are read: one file, or the table files (by suffix:
    CSV, TSV, JSONL, Parquet; hidden files skipped) of a directory (not its subdirectories) or of what a glob
    pattern matches, sorted by name."""
    path = Path(source).expanduser()
    with reading(path):
        if not path.exists() and any(c in str(source) for c in "*?["):
            anchor = Path(path.anchor or ".")
            pattern = str(path.relative_to(anchor)) if path.is_absolute() else str(source)
            files = sorted(
                p for p in anchor.glob(pattern) if p.is_file() and not p.name.startswith(".") and _is_table(p)
            )
            if not files:
                raise InputFileError(f"no catalogue file (CSV, TSV, JSONL, Parquet) matches {str(source)!r}")
            return files
        if not path.exists():
            raise InputFileError(f"catalogue file {str(path)!r} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _is_table(p))
            if not files:
                raise InputFileError(
                    f"catalogue path {str(path)!r} is a directory; pass a CSV, TSV, JSONL or Parquet file, or a "
                    "directory that holds some (this one has none)"
                )
            return files
    return [path]


def _table_suffix(path: Path) -> str:
    """The lower-case suffix that names the table format, behind any compression suffix ('' if none)."""
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _is_table(path: Path) -> bool:
    return _table_suffix(path) in {".csv", *_TAB_SUFFIXES, *_JSONL_SUFFIXES, *_PARQUET_SUFFIXES}


def _separator(path: Path) -> str:
    return "\t" if file_format(path) == "tsv" else ","


def _encoding(encoding: str) -> str:
    # a byte-order mark is read as part of the first column name unless the codec drops it
    return "utf-8-sig" if encoding.lower().replace("_", "-") == "utf-8" else encoding


def read_table(
    path: Path, *, text_columns: Sequence[str] | None = None, chunksize: int | None = None, encoding: str = "utf-8"
) -> Iterator[pd.DataFrame]:
    """The rows of a CSV/TSV/JSONL file (the one reader of user tables: catalogues, pairs, score inputs).

    ``text_columns`` are read as text ("0042" stays "0042", "NA" is text, an empty cell is missing); with
    ``text_columns=None`` every column of a CSV/TSV is text exactly as written and nothing is missing. One frame
    without ``chunksize``, else frames of ``chunksize`` rows. Call inside :func:`reading` for typed errors.
    """
    encoding = _encoding(encoding)
    if file_format(path) == "parquet":
        yield from _read_parquet(path, chunksize)
        return
    if file_format(path) == "jsonl":
        frames: Any = _read_jsonl(path, chunksize, encoding)
        if chunksize is None:
            frames = pd.concat(list(frames), ignore_index=True)
    else:
        text: dict[str, Any] = (
            {"dtype": str} if text_columns is None else {"dtype": dict.fromkeys(text_columns, str), "na_values": [""]}
        )
        frames = pd.read_csv(
            path,
            sep=_separator(path),
            chunksize=chunksize,
            encoding=encoding,
            keep_default_na=False,
            quoting=csv.QUOTE_MINIMAL,
            **text,
        )
    if chunksize is None:
        yield frames
    else:
        yield from frames


def _read_jsonl(path: Path, chunksize: int | None, encoding: str) -> Iterator[pd.DataFrame]:
    """JSON Lines as frames of Python values (object columns): an integer stays an exact int however large and
    whatever other rows lack the key, where pandas would turn the column into floats."""
    from pandas.io.common import get_handle  # type: ignore[import-not-found]  # (absent from pandas-stubs)

    records: list[dict[str, Any]] = []
    yielded = False
    with get_handle(path, "r", encoding=encoding, compression="infer") as handles:
        for number, line in enumerate(handles.handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number}: {exc.msg} (column {exc.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"line {number} is a JSON {type(record).__name__}, not an object of fields")
            records.append(record)
            if chunksize and len(records) >= chunksize:
                yield pd.DataFrame(records, dtype=object)
                yielded, records = True, []
    if records:
        yield pd.DataFrame(records, dtype=object)
    elif not yielded:
        raise pd.errors.EmptyDataError("empty")


_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?\Z")


def typed_text(text: str) -> Any:
    """A CSV/TSV metadata cell as the value it stands for, losing nothing: empty is missing (None); a plainly
    written integer (no leading zero, any size) is an int; a decimal that a float gives back as written (by repr:
    "1.50", "2.25", "1e3") is a float; true/false (any case) are booleans; everything else ("007", "+5", "NaN",
    "1.10000000000000000001") stays the text it was."""
    if not text:
        return None
    if _DECIMAL.match(text):
        if _INT_ID.match(text):
            return int(text)
        number = float(text)
        if math.isfinite(number) and decimal.Decimal(text) == decimal.Decimal(repr(number)):
            return number
        return text
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    return text


def _read_parquet(path: Path, chunksize: int | None) -> Iterator[pd.DataFrame]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputFileError(f"reading {str(path)!r} needs pyarrow: pip install pyarrow (or 'matching[ray]')") from None
    try:
        table = pq.ParquetFile(path)
        if chunksize is None:
            yield table.read().to_pandas(integer_object_nulls=True)
            return
        empty = True
        for batch in table.iter_batches(batch_size=chunksize):
            empty = False
            yield batch.to_pandas(integer_object_nulls=True)  # ints with nulls stay ints
        if empty:
            raise pd.errors.EmptyDataError("empty")
    except pa.ArrowException as exc:
        raise InputFileError(f"{str(path)!r} is not a readable Parquet file ({exc})") from None


def is_int_id(ext_id: str) -> bool:
    """Whether a canonical id is a whole number written plainly (the bundle then hands ids back as ints)."""
    return _INT_ID.match(ext_id) is not None


def canonical_id(value: Any) -> str | None:
    """An external id as the string the store keeps; ``None`` when missing."""
    if _is_missing(value):
        return None
    if isinstance(value, bool | np.bool_):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    return text or None


_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (no UTF-8 encoder or tokenizer takes one)."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def _surrogate(ext_id: str, title: str, metadata: dict[Any, Any]) -> str | None:
    """Which text of a row holds a lone surrogate (such text would be dropped or refused by SQLite), if any."""
    if has_surrogate(ext_id):
        return "the id"
    if has_surrogate(title):
        return "the title"
    for key, value in metadata.items():
        if isinstance(value, str) and has_surrogate(value):
            return f"metadata field {str(key)!r}"
        if isinstance(key, str) and has_surrogate(key):
            return "a metadata field name"
    return None


def _is_missing(value: Any) -> bool:
    """None, NaN, pandas.NA or NaT (scalars only: a list cell is a value)."""
    if value is None:
        return True
    if type(value) in (str, int, bool):  # common cells first (exact types): pd.isna on a scalar costs ~1 us
        return False
    if type(value) is float:
        return bool(value != value)
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


class UnstorableError(ValueError):
    """A metadata value that JSON cannot hold exactly (the caller names its row and column)."""


def json_value(value: Any) -> Any:
    """A metadata cell as the JSON value stored for it, exactly, or :class:`UnstorableError` saying why not.

    Missing (None, NaN, NA, NaT) is null; numbers, text and booleans are themselves; a list or array (a Parquet list
    column) is a JSON array and a dict (a struct) an object, element by element; a date or time is its ISO 8601
    text; a decimal is the float that gives it back as written. Infinities, bytes and other objects are refused.
    """
    if type(value) in (str, int, bool):  # most cells: themselves, as the checks below would find
        return value
    if isinstance(value, np.ndarray | list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if _is_missing(value):
        return None
    if isinstance(value, np.generic) and not isinstance(value, np.datetime64 | np.timedelta64):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise UnstorableError(f"holds {value}, which JSON cannot store; write a number or leave the cell empty")
    if isinstance(value, bool | int | float | str):  # a subclass (an enum) as the plain value JSON writes for it
        return value if type(value) in (bool, int, float, str) else json.loads(json.dumps(value))
    if isinstance(value, np.datetime64):
        value = pd.Timestamp(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal) and value.is_finite():
        number = float(value)
        if decimal.Decimal(repr(number)) == value:
            return number
    raise UnstorableError(
        f"holds {type(value).__name__} {_short(value)}, which metadata cannot store exactly; "
        "convert it to text, a number, a list or a dict"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


class CatalogueReader:
    """Streams a catalogue in chunks, checking columns, titles and id uniqueness as it goes.

    After a full iteration, ``count``, ``skipped`` and ``id_type`` describe what was read.
    """

    def __init__(
        self,
        source: str | Path | pd.DataFrame,
        *,
        id_column: str = "id",
        title_column: str | Sequence[str] = "title",
        skip_bad_rows: bool = False,
        chunksize: int = DEFAULT_CHUNKSIZE,
        encoding: str = "utf-8",
    ) -> None:
        self.source = source
        self.id_column = id_column
        self.title_columns = [title_column] if isinstance(title_column, str) else list(title_column)
        if not self.title_columns:
            raise SchemaError("title_column must name at least one column")
        self.skip_bad_rows = skip_bad_rows
        self.chunksize = max(1, int(chunksize))
        self.encoding = encoding
        self.count = 0
        self.skipped = 0
        self.skipped_examples: list[str] = []
        self._all_int = True
        self._seen: dict[str, int] = {}  # id -> where it was read: file number << 32 | row
        self._files: list[str] = []
        self._name = ""
        self.files: list[Path] = []  # the files of the source, once iteration has started

    @property
    def name(self) -> str:
        """The table being read (the file, for a source of several), as error messages name it."""
        if self._name:
            return self._name
        return "the DataFrame" if isinstance(self.source, pd.DataFrame) else repr(str(self.source))

    @property
    def id_type(self) -> IdType:
        return IdType.INT if self._all_int and self.count else IdType.STR

    def __iter__(self) -> Iterator[Chunk]:
        for frames in self._tables():
            first_row = 1  # rows are counted per file
            for frame in frames:
                chunk = self._validate(frame, first_row)
                first_row += len(frame)
                if len(chunk):
                    yield chunk

    # -- reading ---------------------------------------------------------------------------------

    def _tables(self) -> Iterator[Iterator[pd.DataFrame]]:
        if isinstance(self.source, pd.DataFrame):
            self._check_columns(list(self.source.columns))
            frame = self.source
            yield (frame.iloc[start : start + self.chunksize] for start in range(0, len(frame), self.chunksize))
            return
        files = self.files = catalogue_files(self.source)
        for path in files:
            if len(files) > 1:
                self._name = repr(str(path))
            self._files.append(self._name)
            yield self._file_frames(path)

    def _file_frames(self, path: Path) -> Iterator[pd.DataFrame]:
        with reading(path, self.encoding):
            yield from self._read_file(path)

    def _read_file(self, path: Path) -> Iterator[pd.DataFrame]:
        if file_format(path) in ("csv", "tsv"):
            # the header as written: pandas would rename a repeated "title" to "title.1" and hide the clash
            header = pd.read_csv(
                path,
                sep=_separator(path),
                header=None,
                nrows=1,
                encoding=_encoding(self.encoding),
                dtype=str,
                na_filter=False,
            )
            self._check_columns(header.iloc[0].tolist())
        checked = False
        text = file_format(path) in ("csv", "tsv")
        # CSV/TSV cells are read as written and typed one by one (typed_text): no column-wide guess turns "007"
        # into 7 or an integer column with a gap into floats
        for frame in read_table(
            path,
            text_columns=None if text else [self.id_column, *self.title_columns],
            chunksize=self.chunksize,
            encoding=self.encoding,
        ):
            if not checked:
                self._check_columns(list(frame.columns))
                checked = True
            if text:
                for column in frame.columns:
                    if column != self.id_column and column not in self.title_columns:
                        # a Series built as object: Series.map would infer floats for ints beside a None
                        values = [typed_text(v) for v in frame[column].tolist()]
                        frame[column] = pd.Series(values, index=frame.index, dtype=object)
            yield frame

    def _where(self, seen: int) -> str:
        row = f"row {seen & 0xFFFFFFFF}"
        return f"{self._files[seen >> 32]} {row}" if self._files and self._files[seen >> 32] else row

    def _check_columns(self, columns: list[Any]) -> None:
        names = [str(c) for c in columns]
        missing = [c for c in [self.id_column, *self.title_columns] if c not in names]
        if missing:
            raise SchemaError(
                f"{self.name} has no column {', '.join(map(repr, missing))}; its columns are {names}. "
                "Name the right ones with id_column=/title_column= (--id-column/--title-column)"
            )
        dupes = sorted({c for c in names if c and names.count(c) > 1})  # blank names are pandas' "Unnamed: n"
        if dupes:
            raise SchemaError(f"{self.name} has repeated column names {dupes}; rename them so each is unique")

    # -- validation ------------------------------------------------------------------------------

    def _validate(self, frame: pd.DataFrame, first_row: int) -> Chunk:
        chunk = Chunk()
        meta_columns = [c for c in frame.columns if c != self.id_column and c not in self.title_columns]
        raw_ids = frame[self.id_column].tolist()
        parts = [frame[c].tolist() for c in self.title_columns]
        meta_records: list[dict[Any, Any]] = (
            frame[meta_columns].to_dict("records") if meta_columns else [{} for _ in range(len(frame))]
        )
        duplicates: list[str] = []
        for offset, raw_id in enumerate(raw_ids):
            row = first_row + offset
            ext_id = canonical_id(raw_id) if not isinstance(raw_id, _NOT_TEXT) else None
            pieces = [p[offset] for p in parts]
            bad_title = next(
                ((c, v) for c, v in zip(self.title_columns, pieces, strict=True) if isinstance(v, _NOT_TEXT)), None
            )
            title = "" if bad_title else " ".join(str(v) for v in pieces if not _is_missing(v) and v != "").strip()
            meta, bad_meta = _metadata(meta_records[offset])
            problem = None
            if isinstance(raw_id, (*_NOT_TEXT, bool, np.bool_)):  # a JSON array/object or true/false, not an id
                problem = f"row {row}: the id {_short(raw_id)} in column {self.id_column!r} is not a string or a number"
            elif bad_title is not None:
                problem = f"row {row}: the title column {bad_title[0]!r} holds {_short(bad_title[1])}, not text"
            elif isinstance(raw_id, float | np.floating) and not (_is_missing(raw_id) or abs(float(raw_id)) < _EXACT):
                problem = (
                    f"row {row}: the id {raw_id!r} in column {self.id_column!r} is a float too large to be an exact "
                    "whole number (a missing or fractional id elsewhere in a JSON column makes every id a float); "
                    "write the ids as strings"
                )
            elif ext_id is None:
                problem = f"row {row}: the id column {self.id_column!r} is empty"
            elif (bad := _surrogate(ext_id, title, meta_records[offset])) is not None:
                problem = (
                    f"row {row}: {bad} holds a lone surrogate (half of a UTF-16 pair), which UTF-8 cannot store; "
                    "fix the text where it was decoded"
                )
            elif not title:
                cols = " + ".join(map(repr, self.title_columns))
                problem = f"row {row} (id {ext_id!r}): the title {cols} is empty"
            elif bad_meta is not None:
                problem = f"row {row} (id {ext_id!r}): column {bad_meta}"
            if problem:
                if not self.skip_bad_rows:
                    raise BadRowError(
                        f"{self.name}, {problem}. Fix the row, or skip such rows with "
                        "skip_bad_rows=True (--skip-bad-rows)"
                    )
                self.skipped += 1
                if len(self.skipped_examples) < 5:
                    self.skipped_examples.append(problem)
                continue
            assert ext_id is not None
            if ext_id in self._seen:
                duplicates.append(f"{ext_id!r} (row {row}) first at {self._where(self._seen[ext_id])}")
                continue
            self._seen[ext_id] = max(0, len(self._files) - 1) << 32 | row
            if self._all_int and not _INT_ID.match(ext_id):
                self._all_int = False
            chunk.ids.append(ext_id)
            chunk.titles.append(title)
            chunk.metadata.append(meta)
            chunk.rows.append(row)
        if duplicates:
            shown = ", ".join(duplicates[:5])
            more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
            raise DuplicateIdError(
                f"{self.name} repeats ids in column {self.id_column!r}: {shown}{more}. Ids must be unique"
            )
        self.count += len(chunk)
        return chunk


def _metadata(record: dict[Any, Any]) -> tuple[dict[str, Any], str | None]:
    """A row's metadata as stored, or the first column whose value cannot be, with why."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        try:
            out[str(key)] = json_value(value)
        except UnstorableError as exc:
            return out, f"{str(key)!r} {exc}"
    return out, None


def metadata_json(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, ensure_ascii=False, default=str, allow_nan=False)
