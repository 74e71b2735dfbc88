"""Hostile catalogues (issue #5): each named case ends in a typed error that names the file, row or column
and the fix, with nothing written, or in a documented handling whose stored values are checked exactly.

Cases that ``test_ingest.py`` already covers (a zero-byte CSV, a directory, a missing file, a whole latin-1
file, empty titles and ids, plain duplicates, a BOM before ``id``) are not repeated here.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import hidden_entries

from matching.errors import BadRowError, DuplicateIdError, InputFileError, MatchingError, SchemaError
from matching.ingest import CatalogueReader
from matching.matcher import Matcher
from matching.types import IdType

Make = Callable[[Path], Any]


def write(name: str, data: str | bytes) -> Make:
    """A case maker writing ``data`` (text as UTF-8) to ``name`` in the case's folder."""

    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    return make


def frame(**columns: list[Any]) -> Make:
    return lambda folder: pd.DataFrame(columns)


def build(source: Any, path: Path, encoder: Any, **kwargs: Any) -> Matcher:
    return Matcher.build(source, path, encoder=encoder, show_progress=False, **kwargs)


def read(source: Any, **kwargs: Any) -> tuple[list[str], list[str], CatalogueReader]:
    reader = CatalogueReader(source, **kwargs)
    ids: list[str] = []
    titles: list[str] = []
    for chunk in reader:
        ids += chunk.ids
        titles += chunk.titles
    return ids, titles, reader


def _deep_latin1(folder: Path) -> Path:
    """Valid UTF-8 for ~90 kB, then one latin-1 line: past the buffer pandas decodes at a time."""
    rows = "".join(f"{i},café number {i}\n" for i in range(1, 5000))
    path = folder / "deep.csv"
    path.write_bytes(("id,title\n" + rows).encode() + "5000,crème brûlée\n".encode("latin-1"))
    return path


def _dangling_symlink(folder: Path) -> Path:
    link = folder / "gone.csv"
    link.symlink_to(folder / "deleted.csv")
    return link


def _symlink_to_directory(folder: Path) -> Path:
    (folder / "real").mkdir()
    link = folder / "link.csv"
    link.symlink_to(folder / "real", target_is_directory=True)
    return link


# (maker, build keyword arguments, error type, regex the message must match). "{file}" stands for the
# file name, which every file-level message must contain.
ERROR_CASES = [
    pytest.param(
        write("c.csv", "\ufeff"), {}, InputFileError, r"{file}' is empty: it needs a header", id="bom-only-file"
    ),
    pytest.param(write("c.csv", "\n\n  \n"), {}, InputFileError, r"{file}' is empty", id="blank-lines-only-file"),
    pytest.param(
        write("c.csv", "id,title"),
        {},
        BadRowError,
        r"{file}' has no usable rows \(0 skipped\)",
        id="header-only-no-newline",
    ),
    pytest.param(
        write("c.csv", "\ufeffid,title,brand\n"), {}, BadRowError, r"no usable rows \(0 skipped\)", id="bom-header-only"
    ),
    pytest.param(
        write("c.csv", "id,title\n1,café\n".encode() + "2,crème\n".encode("latin-1")),
        {},
        InputFileError,
        r"{file}' is not valid utf-8 text \(invalid continuation byte on line 3, byte 21\); re-save it as UTF-8 "
        r"or pass its encoding \(encoding='latin-1'",
        id="mixed-encodings",
    ),
    pytest.param(
        _deep_latin1,
        {"chunksize": 1000},
        InputFileError,
        r"{file}' is not valid utf-8 text \(invalid continuation byte on line 5001, byte 112779\)",
        id="mixed-encodings-deep-in-file",
    ),
    pytest.param(
        write("c.csv.gz", gzip.compress("id,title\n1,tea\n2,café\n".encode("latin-1"))),
        {},
        InputFileError,
        r"{file}' is not valid utf-8 text \(invalid continuation byte on line 3, byte 20\)",
        id="latin1-inside-gzip",
    ),
    pytest.param(
        write("c.csv", "id,title\n1,tea\n".encode("utf-16")),
        {},
        InputFileError,
        r"{file}' is not valid utf-8 text \(invalid start byte on line 1, byte 0\)",
        id="utf16-file",
    ),
    pytest.param(
        write("c.csv", gzip.compress(b"id,title\n1,tea\n")),
        {},
        InputFileError,
        r"{file}' is not valid utf-8 text.*encoding",
        id="gzip-without-gz-suffix",
    ),
    pytest.param(
        frame(id=[1, 2, 3], title=["tea", np.nan, None]),
        {},
        BadRowError,
        r"the DataFrame, row 2 \(id '2'\): the title 'title' is empty\. Fix the row, or skip such rows with "
        r"skip_bad_rows=True",
        id="nan-title",
    ),
    pytest.param(
        write("c.csv", "id,title\n1,tea\n2,\u00a0\u3000\t \n"),
        {},
        BadRowError,
        r"{file}', row 2 \(id '2'\): the title 'title' is empty",
        id="unicode-whitespace-only-title",
    ),
    pytest.param(
        write("c.csv", "id,title\n1,tea\n2,\x0b\x0c\x1c\x1f\n"),
        {},
        BadRowError,
        r"row 2 \(id '2'\): the title 'title' is empty",
        id="control-whitespace-only-title",
    ),
    pytest.param(
        write("c.csv", "id,title,brand\n1,tea,Acme\n2\n"),
        {},
        BadRowError,
        r"row 2 \(id '2'\): the title 'title' is empty",
        id="short-row-without-title",
    ),
    pytest.param(
        write("c.csv", "id,title\n1,tea\n\n\n2,\n"),
        {},
        BadRowError,
        r"row 2 \(id '2'\)",  # rows count records after the header; blank lines are not rows
        id="blank-lines-do-not-count-as-rows",
    ),
    pytest.param(
        write("c.csv", "id,title\n 7,tea\n7 ,coffee\n"),
        {},
        DuplicateIdError,
        r"{file}' repeats ids in column 'id': '7' \(row 2\) first at row 1\. Ids must be unique",
        id="duplicate-ids-after-strip",
    ),
    pytest.param(
        write("c.jsonl", '{"id": 1, "title": "tea"}\n{"id": 1.0, "title": "coffee"}\n'),
        {},
        DuplicateIdError,
        r"'1' \(row 2\)",
        id="duplicate-ids-int-and-float-jsonl",
    ),
    pytest.param(
        write("c.jsonl", '{"id": 1, "title": "tea"}\n{"id": {"sku": 2}, "title": "coffee"}\n'),
        {},
        BadRowError,
        r"{file}', row 2: the id \{'sku': 2\} in column 'id' is not a string or a number",
        id="object-id-jsonl",
    ),
    pytest.param(
        write("c.jsonl", '{"id": [1, 2], "title": "tea"}\n'),
        {},
        BadRowError,
        r"row 1: the id \[1, 2\] in column 'id' is not a string or a number",
        id="array-id-jsonl",
    ),
    pytest.param(
        write("c.jsonl", '{"id": 1e20, "title": "tea"}\n'),
        {},
        BadRowError,
        r"row 1: the id 1e\+20 in column 'id' is a float too large to be an exact whole number.*"
        r"write the ids as strings",
        id="big-float-id-jsonl",
    ),
    pytest.param(
        write("c.jsonl", '{"id": 1, "title": "tea"}\n{"id": null, "title": "coffee"}\n'),
        {},
        BadRowError,
        r"row 2: the id column 'id' is empty",
        id="null-id-jsonl",
    ),
    pytest.param(
        write("c.jsonl", "[1, 2]\n"),
        {},
        SchemaError,
        r"{file}' is not valid JSON Lines: line 1 is a JSON list, not an object of fields",
        id="jsonl-array-lines",
    ),
    pytest.param(
        write("c.csv", "id,title,title\n1,tea,green\n"),
        {},
        SchemaError,
        r"{file}' has repeated column names \['title'\]; rename them",
        id="repeated-column-names",
    ),
    pytest.param(
        write("c.csv", " id , title \n1,tea\n"),
        {},
        SchemaError,
        r"no column 'id', 'title'; its columns are \[' id ', ' title '\]\. Name the right ones with id_column=",
        id="padded-header-names",
    ),
    pytest.param(
        write("c.csv", "id,title\n1,tea\n2,tea, green\n3,coffee\n"),
        {},
        SchemaError,
        r"{file}' is not a well-formed table: .*Expected 2 fields in line 3, saw 3\. .*quote a field that holds "
        r"the separator",
        id="unquoted-comma-ragged-row",
    ),
    pytest.param(
        write("c.csv", 'id,title\n1,"tea\n2,coffee\n'),
        {},
        SchemaError,
        r"{file}' is not a well-formed table: .*EOF inside string.*quote a field",
        id="unterminated-quote",
    ),
    pytest.param(_dangling_symlink, {}, InputFileError, r"{file}' does not exist", id="dangling-symlink"),
    pytest.param(
        _symlink_to_directory, {}, InputFileError, r"{file}' is a directory; pass a CSV", id="symlink-to-directory"
    ),
]


def assert_nothing_written(parent: Path, name: str) -> None:
    """No bundle and no hidden building/staging directory; at most the writers' empty lock file."""
    lock = parent / f".{name}.lock"
    assert [p.name for p in parent.iterdir() if p != lock] == []
    assert not lock.exists() or (lock.is_file() and lock.stat().st_size == 0)


def _pattern(pattern: str, source: Any) -> str:
    return pattern.replace("{file}", re.escape(source.name)) if isinstance(source, Path) else pattern


@pytest.mark.parametrize(("make", "kwargs", "error", "pattern"), ERROR_CASES)
def test_hostile_input_fails_typed_and_writes_nothing(
    tmp_path: Path, tiny_encoder: Any, make: Make, kwargs: dict[str, Any], error: type, pattern: str
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = make(inputs)
    parent = tmp_path / "indexes"
    parent.mkdir()
    with pytest.raises(error, match=_pattern(pattern, source)) as info:
        build(source, parent / "products", tiny_encoder, **kwargs)
    assert isinstance(info.value, MatchingError)
    assert_nothing_written(parent, "products")


OVERWRITE_CASES = {"mixed-encodings", "nan-title", "duplicate-ids-after-strip", "unterminated-quote"}


@pytest.mark.parametrize(("make", "kwargs", "error", "pattern"), [p for p in ERROR_CASES if p.id in OVERWRITE_CASES])
def test_failed_overwrite_keeps_the_old_bundle(
    tmp_path: Path, tiny_encoder: Any, own_bundle: Any, make: Make, kwargs: dict[str, Any], error: type, pattern: str
) -> None:
    """overwrite=True with a hostile catalogue: the live bundle stays, loads and answers as before."""
    before = [(h.id, h.title, h.score) for h in own_bundle.search("red running shoes", k=5)]
    path = own_bundle.path
    entries = sorted(p.name for p in path.iterdir())
    with pytest.raises(error):
        build(make(tmp_path), path, tiny_encoder, overwrite=True, **kwargs)
    assert sorted(p.name for p in path.iterdir()) == entries
    assert hidden_entries(path) == []
    assert [n for n in hidden_entries(path.parent) if n != f".{path.name}.lock"] == []
    with Matcher.load(path, encoder=tiny_encoder) as again:
        assert [(h.id, h.title, h.score) for h in again.search("red running shoes", k=5)] == before


# -- permissions -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path, tiny_encoder: Any) -> None:
    path = write("secret.csv", "id,title\n1,tea\n")(tmp_path)
    path.chmod(0)
    try:
        with pytest.raises(InputFileError, match=r"no permission to read '.*secret\.csv'; make it .*readable"):
            build(path, tmp_path / "b", tiny_encoder)
    finally:
        path.chmod(0o600)
    assert_nothing_written(tmp_path, "b")


def test_unreadable_file_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same mapping where the test runs as root: reading the file raises PermissionError."""
    path = write("secret.csv", "id,title\n1,tea\n")(tmp_path)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pd, "read_csv", refuse)
    with pytest.raises(
        InputFileError, match=r"no permission to read '.*secret\.csv'; make it and its folders readable"
    ):
        read(path)


def test_unsearchable_folder_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Path.exists() itself raises PermissionError inside a folder without search permission."""
    path = tmp_path / "locked" / "c.csv"
    real_stat = pathlib.Path.stat

    def stat(self: Path, **kwargs: Any) -> Any:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    with pytest.raises(InputFileError, match=r"no permission to read '.*locked/c\.csv'"):
        read(path)


# -- accepted, with a documented handling ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "ids", "titles"),
    [
        pytest.param('\ufeff"id","title"\n1,tea\n', ["1"], ["tea"], id="bom-before-quoted-header"),
        pytest.param(
            'id,title\n1,"line one\nline two"\n2,"say ""hi"", then go"\n3,5" screen\n4,\'single\'\n',
            ["1", "2", "3", "4"],
            ["line one\nline two", 'say "hi", then go', '5" screen', "'single'"],
            id="embedded-newlines-and-quotes-kept",
        ),
        pytest.param(
            'id,title\r\n1,"a\r\nb"\r\n2,tea\r\n', ["1", "2"], ["a\r\nb", "tea"], id="crlf-file-crlf-inside-quotes"
        ),
        pytest.param("id,title\r1,tea\r2,coffee\r", ["1", "2"], ["tea", "coffee"], id="cr-only-line-endings"),
        pytest.param(
            'id,title\n1,"red\rshoes"\n2,tea\r3,coffee\n',
            ["1", "2", "3"],
            ["red\rshoes", "tea", "coffee"],  # a bare \r outside quotes ends the row, as in every CSV reader
            id="bare-cr-kept-in-quotes-ends-row-outside",
        ),
        pytest.param(
            "id,title\n1,  padded tea \t\n2,\u200b\n",
            ["1", "2"],
            ["padded tea", "\u200b"],  # str.strip(): a zero-width space is not whitespace, so it is a title
            id="titles-stripped-zero-width-kept",
        ),
        pytest.param(
            "id,title\n1.0,tea\n1,coffee\n1e3,cake\n007,jam\n",
            ["1.0", "1", "1e3", "007"],
            ["tea", "coffee", "cake", "jam"],  # CSV ids are text: no number parsing, so no clash
            id="number-like-csv-ids-are-text",
        ),
    ],
)
def test_accepted_csv(tmp_path: Path, data: str, ids: list[str], titles: list[str]) -> None:
    got_ids, got_titles, reader = read(write("c.csv", data)(tmp_path))
    assert got_ids == ids
    assert got_titles == titles
    assert reader.skipped == 0


def test_number_like_ids_type(tmp_path: Path) -> None:
    _, _, text_ids = read(write("c.csv", "id,title\n1.0,tea\n1,coffee\n")(tmp_path))
    assert text_ids.id_type is IdType.STR
    ids, _, big = read(
        write("c.jsonl", '{"id": 12345678901234567890, "title": "tea"}\n{"id": 2, "title": "x"}\n')(tmp_path)
    )
    assert ids == ["12345678901234567890", "2"]
    assert big.id_type is IdType.INT


SQL_TITLES = [
    "'; DROP TABLE titles; --",
    'Robert"); DELETE FROM titles WHERE 1=1; --',
    "1 OR 1=1",
    "%_\\ LIKE '%'",
]
# pandas' C parser before 3.1 cuts a CSV field at a NUL character (3.1 keeps it; JSONL always does)
NUL_KEPT = tuple(int(x) for x in pd.__version__.split(".")[:2]) >= (3, 1)
CONTROL_TITLES = ["esc \x1b[31mred\x1b[0m bell\x07", "tab\tand\vvertical"] + (["nul\x00inside"] if NUL_KEPT else [])


def test_verbatim_titles_survive_the_store(tmp_path: Path, tiny_encoder: Any) -> None:
    """SQL-looking, control-character, newline/quote and 100k-character titles come back byte for byte."""
    long_title = "red running shoes " * 5556  # 100,008 characters; the tokenizer keeps the first max_length tokens
    titles = [*SQL_TITLES, *CONTROL_TITLES, 'line one\nline two, "quoted"', long_title]
    source = tmp_path / "c.csv"
    pd.DataFrame({"id": range(1, len(titles) + 1), "title": titles, "note": SQL_TITLES[:1] * len(titles)}).to_csv(
        source, index=False
    )
    with build(source, tmp_path / "b", tiny_encoder) as matcher:
        assert len(matcher) == len(titles)
        hits = matcher.search("red running shoes", k=len(titles))
    stored = {h.id: h.title for h in hits}
    assert stored == {i: t.strip() for i, t in enumerate(titles, start=1)}
    assert len(stored[len(titles)]) == len(long_title.strip()) > 100_000
    assert {h.id: h.metadata for h in hits}[1] == {"note": SQL_TITLES[0]}
    # truncated by the tokenizer only: the long title encodes like any prefix longer than max_length tokens
    prefix = "red running shoes " * (tiny_encoder.max_length // 2)
    vectors = tiny_encoder.encode_titles([long_title.strip(), prefix.strip()])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)
