"""Property test: any catalogue of unicode ids and titles, written by pandas or the csv module in any common
dialect, reads back through :class:`CatalogueReader` exactly as a simple model of the input rules says.

The rules modelled: ids and titles are stripped (``str.strip``); an empty id or title is a bad row (a
:class:`BadRowError` naming its row, or skipped with ``skip_bad_rows``); a repeated id is reported per chunk
as a :class:`DuplicateIdError` naming id and row; everything else comes back verbatim, in order.
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matching.errors import BadRowError, DuplicateIdError
from matching.ingest import CatalogueReader
from matching.types import IdType

# awkward pieces a CSV writer or reader could get wrong, mixed into arbitrary (surrogate-free) text
# pandas' C parser before 3.1 cuts a CSV field at a NUL character (3.1 keeps it): test NUL only where it is kept
NUL_KEPT = tuple(int(x) for x in pd.__version__.split(".")[:2]) >= (3, 1)
PIECES = [",", '"', "'", '""', "\n", "\r\n", "\r", "\t", " ", "\u00a0", "\ufeff", "\x1b", "#", "NA", "nan"]
PIECES += ["\x00"] if NUL_KEPT else []
PIECES += ["'; DROP TABLE titles; --", "1e3", "-0", "\u200b", "\u3000", "é", "\U0001f600"]
TEXT = st.lists(
    st.one_of(
        st.sampled_from(PIECES),
        st.text(st.characters(exclude_categories=("Cs",), exclude_characters="" if NUL_KEPT else "\x00"), max_size=8),
    ),
    max_size=5,
).map("".join)
IDS = st.one_of(st.integers(-3, 30).map(str), st.sampled_from(["", " ", "007", " 7", "SKU-1", "1.0"]), TEXT)
ROWS = st.lists(st.tuples(IDS, TEXT, TEXT), min_size=1, max_size=12)


def _pandas(**kwargs: Any) -> Callable[[pd.DataFrame, Path], Path]:
    def write(df: pd.DataFrame, folder: Path) -> Path:
        path = folder / ("c.tsv" if kwargs.get("sep") == "\t" else "c.csv")
        df.to_csv(path, index=False, **kwargs)
        return path

    return write


def _csv_module(**kwargs: Any) -> Callable[[pd.DataFrame, Path], Path]:
    def write(df: pd.DataFrame, folder: Path) -> Path:
        path = folder / "c.csv"
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, **kwargs)
            writer.writerow(df.columns)
            writer.writerows(df.itertuples(index=False))
        return path

    return write


def _jsonl(df: pd.DataFrame, folder: Path) -> Path:
    path = folder / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")), encoding="utf-8")
    return path


WRITERS = {
    "pandas": _pandas(),
    "pandas-quote-all": _pandas(quoting=csv.QUOTE_ALL),
    "pandas-crlf": _pandas(lineterminator="\r\n"),
    "pandas-bom": _pandas(encoding="utf-8-sig"),
    "pandas-tsv": _pandas(sep="\t"),
    "csv-excel": _csv_module(),
    "csv-quote-nonnumeric": _csv_module(quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n"),
    "jsonl": _jsonl,
}
# pandas' to_csv quotes a field holding "\n" but not one holding a bare "\r", which every CSV reader (this
# one too) takes as a line break: tested as a documented rule in test_hostile_input.py, not round-tripped here
BARE_CR_UNQUOTED = {"pandas", "pandas-bom", "pandas-tsv"}
_BARE_CR = re.compile(r"\r(?!\n)")
_INT = re.compile(r"-?(0|[1-9][0-9]*)\Z")


def expected(rows: list[tuple[str, str, str]], chunksize: int, skip_bad_rows: bool) -> tuple[Any, ...]:
    """('ok', ids, titles, skipped) or ('error', type, fragment) as the documented rules give it."""
    seen: set[str] = set()
    ids: list[str] = []
    titles: list[str] = []
    skipped = 0
    for start in range(0, len(rows), chunksize):
        duplicates = []
        for row, (raw_id, raw_title, _) in enumerate(rows[start : start + chunksize], start=start + 1):
            ext_id, title = raw_id.strip(), raw_title.strip()
            if not ext_id or not title:
                if not skip_bad_rows:
                    return ("error", BadRowError, f"row {row}" + ("" if not ext_id else f" (id {ext_id!r})"))
                skipped += 1
            elif ext_id in seen:
                duplicates.append(f"{ext_id!r} (row {row})")
            else:
                seen.add(ext_id)
                ids.append(ext_id)
                titles.append(title)
        if duplicates:
            return ("error", DuplicateIdError, duplicates[0])
    return ("ok", ids, titles, skipped)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=ROWS,
    writer=st.sampled_from(sorted(WRITERS)),
    chunksize=st.integers(1, 5),
    skip_bad_rows=st.booleans(),
)
def test_written_catalogues_read_back_by_the_rules(
    rows: list[tuple[str, str, str]], writer: str, chunksize: int, skip_bad_rows: bool
) -> None:
    if writer in BARE_CR_UNQUOTED:
        rows = [(_BARE_CR.sub("", i), _BARE_CR.sub("", t), _BARE_CR.sub("", n)) for i, t, n in rows]
    df = pd.DataFrame(rows, columns=["id", "title", "note"])
    want = expected(rows, chunksize, skip_bad_rows)
    with tempfile.TemporaryDirectory() as folder:
        reader = CatalogueReader(WRITERS[writer](df, Path(folder)), chunksize=chunksize, skip_bad_rows=skip_bad_rows)
        ids: list[str] = []
        titles: list[str] = []
        error: BadRowError | DuplicateIdError | None = None
        try:
            for chunk in reader:
                assert all(m.keys() == {"note"} for m in chunk.metadata)
                ids += chunk.ids
                titles += chunk.titles
        except (BadRowError, DuplicateIdError) as exc:  # any other exception fails the test
            error = exc
    if error is not None:
        assert want[:2] == ("error", type(error)), f"unexpected {error!r}"
        assert want[2] in str(error)
        assert "skip_bad_rows=True" in str(error) or "Ids must be unique" in str(error)
        return
    assert want[0] == "ok", f"expected {want}"
    assert (ids, titles, reader.skipped, reader.count) == (want[1], want[2], want[3], len(want[1]))
    all_int = bool(ids) and all(_INT.match(i) for i in ids)
    assert reader.id_type is (IdType.INT if all_int else IdType.STR)
