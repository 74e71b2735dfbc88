"""Batch scoring of (query, title) pairs from a file, streamed in chunks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from matching import progress
from matching.bundle import enclosing_bundle
from matching.errors import InputFileError, SchemaError
from matching.ingest import file_format, read_table, reading

if TYPE_CHECKING:
    from matching.search import Snapshot


def score_file(
    snap: Snapshot,
    source: Path,
    out: Path,
    *,
    query_column: str = "query",
    title_column: str = "title",
    chunksize: int = 20_000,
    show_progress: bool = True,
) -> int:
    """Write every row of ``source`` to ``out``, in order, with ``score`` and ``cosine`` columns added.

    The output appears only when complete (written to a temporary file, then renamed).
    """
    if not source.is_file():
        raise InputFileError(f"pairs file {str(source)!r} does not exist or is not a file")
    if out.is_dir():
        raise InputFileError(f"--out {str(out)!r} is a directory; give a file path such as {str(out / 'scores.csv')!r}")
    bundle = enclosing_bundle(out.parent)
    if bundle is not None:
        raise InputFileError(
            f"--out {str(out)!r} is inside the bundle {str(bundle)!r}, which only its own writer may change; "
            "write the scores elsewhere"
        )
    if {".zip", ".tar"} & {s.lower() for s in out.suffixes}:
        raise InputFileError(f"cannot stream scores into an archive ({str(out)!r}); use .csv, .tsv or .csv.gz")
    sep = "\t" if file_format(source) == "tsv" else ","
    out_sep = "\t" if file_format(out) == "tsv" else ","
    with reading(source):
        header = pd.read_csv(source, sep=sep, nrows=0, encoding="utf-8-sig")
    taken = [c for c in ("score", "cosine") if c in header.columns]
    if taken:
        raise SchemaError(f"{str(source)!r} already has column(s) {taken}, which the output adds; rename them")
    missing = [c for c in (query_column, title_column) if c not in header.columns]
    if missing:
        raise SchemaError(
            f"{str(source)!r} has no column {missing}; its columns are {list(header.columns)}. "
            "Name them with --query-column/--title-column"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # same suffixes as the output, so pandas infers the same compression (.csv.gz and the like)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix="".join(out.suffixes), dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    total = 0
    try:
        # every column as text, so what is not scored is written back exactly as read
        reader = read_table(source, chunksize=chunksize)  # every column as text, nothing missing
        with reading(source), progress.bar(show_progress, desc="scoring pairs", unit="pair") as bar:
            for frame in reader:
                queries, titles = frame[query_column].tolist(), frame[title_column].tolist()
                q, t = snap.encode_pairs(queries, titles)
                frame = frame.assign(score=snap.pair_scores(queries, titles, q, t), cosine=np.einsum("ij,ij->i", q, t))
                frame.to_csv(tmp, mode="a", header=total == 0, index=False, sep=out_sep)
                total += len(frame)
                bar.update(len(frame))
        if total == 0:  # a header-only input still gets a header-only output
            header.assign(score=[], cosine=[]).to_csv(tmp, index=False, sep=out_sep)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return total
