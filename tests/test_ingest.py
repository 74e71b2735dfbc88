"""Reading catalogues: formats, ids, metadata, bad rows, duplicates and unreadable files.

Error cases are checked on :class:`CatalogueReader` and end to end through :meth:`Matcher.build`, which must
leave neither the bundle nor a hidden building directory behind.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import hidden_entries

from matching.errors import BadRowError, DuplicateIdError, InputFileError, MatchingError, SchemaError
from matching.ingest import CatalogueReader, Chunk, canonical_id, file_format
from matching.matcher import Matcher
from matching.types import IdType

SMALL = pd.DataFrame(
    {
        "id": [11, 12, 13, 14, 15],
        "title": ["red running shoes", "coffee maker", "yoga mat", "desk lamp", "blue water bottle"],
        "brand": ["Acme", "Globex", "Acme", "Initech", "Contoso"],
        "price": [59.5, 89.0, 20.25, 15.0, 9.99],
    }
)


def read_all(reader: CatalogueReader) -> Chunk:
    """Every chunk of ``reader`` concatenated into one."""
    out = Chunk()
    for chunk in reader:
        out.ids += chunk.ids
        out.titles += chunk.titles
        out.metadata += chunk.metadata
        out.rows += chunk.rows
    return out


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def build(source: Any, path: Path, encoder: Any, **kwargs: Any) -> Matcher:
    return Matcher.build(source, path, encoder=encoder, show_progress=False, **kwargs)


# -- formats and values --------------------------------------------------------------------------------


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path.with_suffix(".csv"), index=False)
    return path.with_suffix(".csv")


def _write_tsv(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path.with_suffix(".tsv"), index=False, sep="\t")
    return path.with_suffix(".tsv")


def _write_jsonl(df: pd.DataFrame, path: Path) -> Path:
    target = path.with_suffix(".jsonl")
    target.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")), encoding="utf-8")
    return target


def _write_csv_gz(df: pd.DataFrame, path: Path) -> Path:
    target = path.with_suffix(".csv.gz")
    with gzip.open(target, "wt", encoding="utf-8") as fh:
        df.to_csv(fh, index=False)
    return target


WRITERS = [
    pytest.param(_write_csv, id="csv"),
    pytest.param(_write_tsv, id="tsv"),
    pytest.param(_write_jsonl, id="jsonl"),
    pytest.param(_write_csv_gz, id="csv-gz"),
    pytest.param(lambda df, path: df, id="dataframe"),
]


@pytest.mark.parametrize("write", WRITERS)
def test_every_format_reads_the_same_rows(tmp_path: Path, write: Callable[..., Any]) -> None:
    reader = CatalogueReader(write(SMALL, tmp_path / "catalogue"))
    chunk = read_all(reader)
    assert chunk.ids == ["11", "12", "13", "14", "15"]
    assert chunk.titles == SMALL["title"].tolist()
    assert chunk.metadata == [{"brand": b, "price": p} for b, p in zip(SMALL["brand"], SMALL["price"], strict=True)]
    assert chunk.rows == [1, 2, 3, 4, 5]
    assert reader.count == 5
    assert reader.skipped == 0
    assert reader.id_type is IdType.INT


@pytest.mark.parametrize("chunksize", [1, 7, 40, 1000], ids=lambda c: f"chunksize-{c}")
def test_chunks_cover_every_row_once(catalogue_df: pd.DataFrame, tmp_path: Path, chunksize: int) -> None:
    path = tmp_path / "catalogue.csv"
    catalogue_df.to_csv(path, index=False)
    reader = CatalogueReader(path, chunksize=chunksize)
    sizes = [len(chunk) for chunk in CatalogueReader(path, chunksize=chunksize)]
    chunk = read_all(reader)
    assert sizes == [min(chunksize, 40 - start) for start in range(0, 40, chunksize)]
    assert chunk.ids == [str(i) for i in catalogue_df["id"]]
    assert chunk.titles == catalogue_df["title"].tolist()
    assert chunk.rows == list(range(1, 41))
    assert chunk.metadata[-1] == {
        "brand": catalogue_df["brand"].iloc[-1],
        "price": catalogue_df["price"].iloc[-1],
    }
    assert reader.count == 40


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.csv", "csv"),
        ("a.tsv", "tsv"),
        ("a.TXT", "tsv"),
        ("a.tab.gz", "tsv"),
        ("a.jsonl", "jsonl"),
        ("a.ndjson.bz2", "jsonl"),
        ("a.csv.zip", "csv"),
        ("noext", "csv"),
    ],
)
def test_file_format_from_suffix(name: str, expected: str) -> None:
    assert file_format(Path(name)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, "7"),
        (-3, "-3"),
        (7.0, "7"),
        (7.5, "7.5"),
        (float("nan"), None),
        (None, None),
        ("  SKU-1 ", "SKU-1"),
        ("   ", None),
        ("007", "007"),
    ],
    ids=[
        "int",
        "negative",
        "integral-float",
        "float",
        "nan",
        "none",
        "padded-str",
        "blank-str",
        "leading-zero",
    ],
)
def test_canonical_id(value: Any, expected: str | None) -> None:
    assert canonical_id(value) == expected


@pytest.mark.parametrize("write", [p for p in WRITERS if p.id in {"csv", "jsonl"}])
def test_metadata_columns_are_kept_through_search(tmp_path: Path, tiny_encoder: Any, write: Callable[..., Any]) -> None:
    source = write(SMALL, tmp_path / "catalogue")
    with build(source, tmp_path / "bundle", tiny_encoder) as matcher:
        hits = matcher.search("coffee maker", k=5)
    by_id = {h.id: h for h in hits}
    assert by_id[12].title == "coffee maker"
    assert by_id[12].metadata == {"brand": "Globex", "price": 89.0}
    assert by_id[15].metadata == {"brand": "Contoso", "price": 9.99}


@pytest.mark.parametrize(
    ("ids", "expected_type"),
    [
        pytest.param(["11", "12", "13"], int, id="integers"),
        pytest.param(["-1", "0", "5"], int, id="signed-integers"),
        pytest.param(["SKU-1", "SKU-2", "SKU-3"], str, id="strings"),
        pytest.param(["007", "008", "009"], str, id="leading-zeros-stay-text"),
        pytest.param(["1", "2", "x3"], str, id="mixed"),
    ],
)
def test_search_hands_ids_back_in_their_type(
    tmp_path: Path, tiny_encoder: Any, ids: list[str], expected_type: type
) -> None:
    titles = ["red running shoes", "coffee maker", "yoga mat"]
    csv = write_text(tmp_path / "c.csv", "id,title\n" + "".join(f"{i},{t}\n" for i, t in zip(ids, titles, strict=True)))
    with build(csv, tmp_path / "bundle", tiny_encoder) as matcher:
        hits = matcher.search("coffee maker", k=3)
        assert matcher.manifest.id_type == expected_type.__name__
    assert all(type(h.id) is expected_type for h in hits)
    assert sorted((h.id for h in hits), key=str) == sorted((expected_type(i) for i in ids), key=str)
    assert {h.title: h.id for h in hits}["coffee maker"] == expected_type(ids[1])


def test_utf8_bom_does_not_hide_the_first_column_name(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffid,title\n1,red running shoes\n".encode())
    chunk = read_all(CatalogueReader(path))
    assert chunk.ids == ["1"]
    assert chunk.titles == ["red running shoes"]


def test_utf8_bom_in_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(('\ufeff{"id": 1, "title": "red running shoes"}\n').encode())
    assert read_all(CatalogueReader(path)).titles == ["red running shoes"]


def test_other_encodings_can_be_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("id,title\n1,café crème\n".encode("latin-1"))
    assert read_all(CatalogueReader(path, encoding="latin-1")).titles == ["café crème"]


def test_several_title_columns_are_joined_with_a_space(tmp_path: Path) -> None:
    csv = write_text(
        tmp_path / "c.csv",
        "id,brand,title,price\n1,Acme,red running shoes,10\n2,,coffee maker,20\n3,Globex,yoga mat,30\n",
    )
    reader = CatalogueReader(csv, title_column=["brand", "title"])
    chunk = read_all(reader)
    assert chunk.titles == ["Acme red running shoes", "coffee maker", "Globex yoga mat"]
    assert chunk.metadata == [{"price": 10}, {"price": 20}, {"price": 30}]


def test_several_title_columns_through_build(tmp_path: Path, tiny_encoder: Any) -> None:
    with build(SMALL, tmp_path / "bundle", tiny_encoder, title_column=["brand", "title"]) as matcher:
        hits = matcher.search("Globex coffee maker", k=5)
        assert matcher.manifest.source["title_columns"] == ["brand", "title"]
    assert {h.id: h.title for h in hits}[12] == "Globex coffee maker"
    assert {h.id: h.metadata for h in hits}[12] == {"price": 89.0}


@pytest.mark.parametrize("text", ["NA", "N/A", "null", "NaN", "None", "n/a"])
def test_na_like_titles_are_text(tmp_path: Path, tiny_encoder: Any, text: str) -> None:
    csv = write_text(tmp_path / "c.csv", f"id,title,brand\n1,{text},{text}\n2,coffee maker,Acme\n")
    assert read_all(CatalogueReader(csv)).titles == [text, "coffee maker"]
    with build(csv, tmp_path / "bundle", tiny_encoder) as matcher:
        hit = {h.id: h for h in matcher.search(text, k=2)}[1]
    assert hit.title == text
    assert hit.metadata == {"brand": text}


def test_empty_metadata_cell_becomes_null(tmp_path: Path) -> None:
    csv = write_text(tmp_path / "c.csv", "id,title,brand,price\n1,yoga mat,,3.5\n2,desk lamp,Acme,\n")
    assert read_all(CatalogueReader(csv)).metadata == [
        {"brand": None, "price": 3.5},
        {"brand": "Acme", "price": None},
    ]


# -- bad rows and duplicates ---------------------------------------------------------------------------


@pytest.mark.parametrize("title", ["", "   ", '"  "'], ids=["empty", "spaces", "quoted-spaces"])
def test_empty_title_names_the_row(tmp_path: Path, title: str) -> None:
    csv = write_text(tmp_path / "c.csv", f"id,title\n1,yoga mat\n2,desk lamp\nX-3,{title}\n4,coffee maker\n")
    with pytest.raises(BadRowError, match=r"row 3 \(id 'X-3'\).*'title' is empty"):
        read_all(CatalogueReader(csv))


def test_empty_title_row_number_counts_across_chunks(tmp_path: Path) -> None:
    lines = [f"{i},title number {i}" for i in range(1, 8)]
    lines[5] = "6,"
    csv = write_text(tmp_path / "c.csv", "id,title\n" + "\n".join(lines) + "\n")
    with pytest.raises(BadRowError, match=r"row 6 \(id '6'\)"):
        read_all(CatalogueReader(csv, chunksize=3))


def test_empty_id_names_the_row(tmp_path: Path) -> None:
    csv = write_text(tmp_path / "c.csv", "id,title\n1,yoga mat\n,desk lamp\n")
    with pytest.raises(BadRowError, match=r"row 2: the id column 'id' is empty"):
        read_all(CatalogueReader(csv))


BAD_ROWS_CSV = (
    "id,title,brand\n1,yoga mat,Acme\n2,,Acme\n3,desk lamp,Globex\n,coffee maker,x\n5,  ,x\n6,water bottle,x\n"
)


def test_skip_bad_rows_skips_and_counts(tmp_path: Path) -> None:
    reader = CatalogueReader(write_text(tmp_path / "c.csv", BAD_ROWS_CSV), skip_bad_rows=True, chunksize=2)
    chunk = read_all(reader)
    assert chunk.ids == ["1", "3", "6"]
    assert chunk.rows == [1, 3, 6]
    assert reader.count == 3
    assert reader.skipped == 3
    assert len(reader.skipped_examples) == 3
    assert reader.skipped_examples[0].startswith("row 2 (id '2')")


def test_skip_bad_rows_is_recorded_in_the_manifest(tmp_path: Path, tiny_encoder: Any) -> None:
    csv = write_text(tmp_path / "c.csv", BAD_ROWS_CSV)
    with build(csv, tmp_path / "bundle", tiny_encoder, skip_bad_rows=True) as matcher:
        assert matcher.manifest.source["skipped_rows"] == 3
        assert matcher.manifest.count == 3
        assert len(matcher) == 3
        assert sorted(h.id for h in matcher.search("yoga mat", k=10)) == [1, 3, 6]


def test_duplicate_ids_name_the_id(tmp_path: Path) -> None:
    csv = write_text(tmp_path / "c.csv", "id,title\n1,yoga mat\nA-7,desk lamp\nA-7,coffee maker\n")
    with pytest.raises(DuplicateIdError, match=r"'A-7' \(row 3\)"):
        read_all(CatalogueReader(csv))


@pytest.mark.parametrize("chunksize", [1, 3, 100], ids=lambda c: f"chunksize-{c}")
def test_duplicate_ids_across_chunk_boundaries(tmp_path: Path, chunksize: int) -> None:
    lines = "".join(f"{i},title number {i}\n" for i in range(1, 8))
    csv = write_text(tmp_path / "c.csv", "id,title\n" + lines + "2,another title\n")
    with pytest.raises(DuplicateIdError, match=r"'2' \(row 8\)"):
        read_all(CatalogueReader(csv, chunksize=chunksize))


def test_integer_and_float_spellings_of_an_id_are_duplicates() -> None:
    df = pd.DataFrame({"id": [1.0, 2.0, 1.0], "title": ["yoga mat", "desk lamp", "coffee maker"]})
    with pytest.raises(DuplicateIdError, match="'1'"):
        read_all(CatalogueReader(df))


def test_many_duplicates_are_summarised() -> None:
    df = pd.DataFrame({"id": list(range(10)) * 2, "title": [f"title {i}" for i in range(20)]})
    with pytest.raises(DuplicateIdError, match="and 5 more"):
        read_all(CatalogueReader(df))


def test_pandas_na_title_is_an_empty_title() -> None:
    df = pd.DataFrame({"id": [1, 2], "title": pd.array(["yoga mat", None], dtype="string")})
    with pytest.raises(BadRowError, match="row 2"):
        read_all(CatalogueReader(df))


def test_pandas_na_id_is_an_empty_id() -> None:
    df = pd.DataFrame({"id": pd.array([1, None], dtype="Int64"), "title": ["yoga mat", "desk lamp"]})
    with pytest.raises(BadRowError, match="row 2: the id column"):
        read_all(CatalogueReader(df))


# -- unreadable files and wrong shapes: reader and Matcher.build ---------------------------------------


def _missing_column(d: Path) -> Path:
    return write_text(d / "c.csv", "id,name,brand\n1,yoga mat,Acme\n")


def _empty_title(d: Path) -> Path:
    return write_text(d / "c.csv", "id,title\n1,yoga mat\n2,desk lamp\n3,\n")


def _empty_title_later_chunk(d: Path) -> Path:
    rows = "".join(f"{i},title number {i}\n" for i in range(1, 10))
    return write_text(d / "c.csv", "id,title\n" + rows + "10,   \n")


def _duplicate_across_chunks(d: Path) -> Path:
    return write_text(d / "c.csv", "id,title\n1,yoga mat\n2,desk lamp\n3,coffee maker\n4,red shoes\n1,blue cap\n")


def _latin1(d: Path) -> Path:
    path = d / "c.csv"
    path.write_bytes("id,title\n1,yoga mat\n2,café crème\n".encode("latin-1"))
    return path


def _empty_file(d: Path) -> Path:
    return write_text(d / "c.csv", "")


def _empty_jsonl(d: Path) -> Path:
    return write_text(d / "c.jsonl", "")


def _directory(d: Path) -> Path:
    path = d / "catalogue.csv"
    path.mkdir()
    return path


def _missing_file(d: Path) -> Path:
    return d / "no-such-file.csv"


def _bad_jsonl(d: Path) -> Path:
    return write_text(d / "c.jsonl", '{"id": 1, "title": "yoga mat"}\n{"id": 2, "title": \n')


ERROR_CASES = [
    pytest.param(
        _missing_column,
        {},
        SchemaError,
        r"no column 'title'; its columns are \['id', 'name', 'brand'\]",
        id="missing-column",
    ),
    pytest.param(
        _missing_column,
        {"id_column": "sku"},
        SchemaError,
        r"no column 'sku', 'title'",
        id="missing-id-and-title-columns",
    ),
    pytest.param(_empty_title, {}, BadRowError, r"row 3 \(id '3'\)", id="empty-title"),
    pytest.param(
        _empty_title_later_chunk,
        {"chunksize": 3},
        BadRowError,
        r"row 10 \(id '10'\)",
        id="empty-title-in-a-later-chunk",
    ),
    pytest.param(
        _duplicate_across_chunks,
        {"chunksize": 3},
        DuplicateIdError,
        r"'1' \(row 5\)",
        id="duplicate-across-chunks",
    ),
    pytest.param(_latin1, {}, InputFileError, r"not valid utf-8.*encoding", id="latin1-as-utf8"),
    pytest.param(_empty_file, {}, InputFileError, "is empty", id="empty-csv"),
    pytest.param(_empty_jsonl, {}, InputFileError, "is empty", id="empty-jsonl"),
    pytest.param(_directory, {}, InputFileError, "is a directory", id="directory"),
    pytest.param(_missing_file, {}, InputFileError, "does not exist", id="missing-file"),
    pytest.param(_bad_jsonl, {}, SchemaError, "not valid JSON Lines", id="bad-jsonl"),
]


@pytest.mark.parametrize(("make", "kwargs", "error", "pattern"), ERROR_CASES)
def test_reader_errors(
    tmp_path: Path, make: Callable[[Path], Path], kwargs: dict[str, Any], error: type, pattern: str
) -> None:
    source = make(tmp_path)
    with pytest.raises(error, match=pattern) as info:
        read_all(CatalogueReader(source, **kwargs))
    assert isinstance(info.value, MatchingError)


def _header_only(d: Path) -> Path:
    return write_text(d / "c.csv", "id,title,brand\n")


def _all_rows_bad_and_skipped(d: Path) -> Path:
    return write_text(d / "c.csv", "id,title\n1,\n2,  \n")


def test_header_only_file_reads_no_rows(tmp_path: Path) -> None:
    reader = CatalogueReader(_header_only(tmp_path))
    assert list(reader) == []
    assert reader.count == 0
    assert reader.id_type is IdType.STR


BUILD_ONLY_CASES = [
    pytest.param(_header_only, {}, BadRowError, r"no usable rows \(0 skipped\)", id="header-only"),
    pytest.param(
        _all_rows_bad_and_skipped,
        {"skip_bad_rows": True},
        BadRowError,
        r"no usable rows \(2 skipped\)",
        id="every-row-skipped",
    ),
]


@pytest.mark.parametrize(("make", "kwargs", "error", "pattern"), ERROR_CASES + BUILD_ONLY_CASES)
def test_failed_build_leaves_nothing_behind(
    tmp_path: Path,
    tiny_encoder: Any,
    make: Callable[[Path], Path],
    kwargs: dict[str, Any],
    error: type,
    pattern: str,
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = make(inputs)
    parent = tmp_path / "indexes"
    parent.mkdir()
    out = parent / "products"
    with pytest.raises(error, match=pattern):
        build(source, out, tiny_encoder, **kwargs)
    assert not out.exists()
    assert hidden_entries(parent) == []
    assert list(parent.iterdir()) == []


def test_failed_build_into_a_missing_parent_leaves_no_bundle(tmp_path: Path, tiny_encoder: Any) -> None:
    out = tmp_path / "new" / "deeper" / "products"
    with pytest.raises(BadRowError):
        build(_empty_title(tmp_path), out, tiny_encoder)
    assert not out.exists()
    assert hidden_entries(out.parent) == []


# -- sources of several files ----------------------------------------------------------------------------


def _rows(reader: CatalogueReader) -> list[tuple[str, str, dict[str, Any]]]:
    return [(i, t, m) for chunk in reader for i, t, m in zip(chunk.ids, chunk.titles, chunk.metadata, strict=True)]


def test_a_directory_or_glob_of_files_reads_as_their_concatenation(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    df = pd.DataFrame(
        {
            "id": ["a1", "a2", "b1", "c1", "c2"],
            "title": ["t a1", "t a2", "t b1", "t c1", "t c2"],
            "price": [1.5, 2.0, 3.25, 4.0, 5.5],
        }
    )
    src = tmp_path / "src"
    src.mkdir()
    df.iloc[:2].to_csv(src / "a.csv", index=False)
    df.iloc[2:3].to_json(src / "b.jsonl.gz", orient="records", lines=True)
    df.iloc[3:].to_parquet(src / "c.parquet")
    (src / ".hidden.csv").write_text("id,title\nzz,hidden\n", encoding="utf-8")
    (src / "notes.md").write_text("not a table\n", encoding="utf-8")
    df.to_csv(tmp_path / "all.csv", index=False)
    whole = _rows(CatalogueReader(tmp_path / "all.csv"))
    assert _rows(CatalogueReader(src)) == whole
    assert _rows(CatalogueReader(str(src / "*"))) == whole
    assert _rows(CatalogueReader(str(src / "[ab]*"))) == whole[:3]
    reader = CatalogueReader(src)
    _rows(reader)
    assert [p.name for p in reader.files] == ["a.csv", "b.jsonl.gz", "c.parquet"]


def test_sources_of_several_files_name_the_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("id,title\n1,one\n2,two\n", encoding="utf-8")
    (src / "b.csv").write_text("id,title\n3,three\n1,one again\n", encoding="utf-8")
    with pytest.raises(
        DuplicateIdError, match=r"b\.csv' repeats ids in column 'id': '1' \(row 2\) first at '[^']*a\.csv' row 1"
    ):
        _rows(CatalogueReader(src))
    (src / "b.csv").write_text("id,title\n3,three\n4,\n", encoding="utf-8")
    with pytest.raises(BadRowError, match=r"b\.csv', row 2 \(id '4'\): the title 'title' is empty"):
        _rows(CatalogueReader(src))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputFileError, match="is a directory; pass a CSV, TSV, JSONL or Parquet file"):
        _rows(CatalogueReader(empty))
    with pytest.raises(InputFileError, match=r"no catalogue file \(CSV, TSV, JSONL, Parquet\) matches '.*\*\.tsv'"):
        _rows(CatalogueReader(str(src / "*.tsv")))
