"""Building a bundle from a catalogue: rows are read and encoded here (engine ``local``) or on a Ray cluster
(engine ``ray``, :mod:`matching.distributed`); either way one generation is written by :mod:`matching.generation`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from tqdm.auto import tqdm

from matching import __version__, generation
from matching.analysis import Analyzer
from matching.bundle import Manifest, new_generation
from matching.config import IndexConfig, ScorerConfig
from matching.encoder import Encoder, UnknownTokens
from matching.errors import BadRowError
from matching.ingest import CatalogueReader, Encoded, metadata_json
from matching.scorer import Scorer
from matching.store import Store
from matching.types import Engine, IdType, Retrieval


class RowSource(Protocol):
    """What a build reads from: encoded rows, then what was read (known once the iteration ends)."""

    name: str
    title_columns: list[str]
    count: int
    skipped: int
    skipped_examples: list[str]

    @property
    def id_type(self) -> IdType: ...

    def __iter__(self) -> Iterator[Encoded]: ...

    def record(self) -> dict[str, Any]:
        """How the rows were read and encoded, for the manifest."""
        ...


class LocalSource:
    """Rows read by :class:`CatalogueReader` and encoded in this process."""

    def __init__(self, reader: CatalogueReader, encoder: Encoder) -> None:
        self.reader = reader
        self.encoder = encoder
        self.name = reader.name
        self.title_columns = reader.title_columns
        self.count = self.skipped = 0
        self.skipped_examples: list[str] = []

    @property
    def id_type(self) -> IdType:
        return self.reader.id_type

    def __iter__(self) -> Iterator[Encoded]:
        for chunk in self.reader:
            vectors = self.encoder.encode_titles(chunk.titles)
            yield Encoded(chunk.ids, chunk.titles, [metadata_json(m) for m in chunk.metadata], vectors)
        self.count, self.skipped = self.reader.count, self.reader.skipped
        self.skipped_examples = self.reader.skipped_examples

    def record(self) -> dict[str, Any]:
        return {"engine": Engine.LOCAL.value, "files": len(self.reader.files)}


def build_bundle(
    source: str | Path | pd.DataFrame,
    path: Path,
    encoder: Encoder,
    *,
    id_column: str,
    title_column: str | Sequence[str],
    index_config: IndexConfig,
    scorer_config: ScorerConfig,
    analyzer: Analyzer,
    retrieval: Retrieval | None,
    skip_bad_rows: bool,
    encoding: str,
    chunksize: int,
    overwrite: bool,
    show_progress: bool,
    lock_timeout: float,
    engine: Engine = Engine.LOCAL,
    ray_address: str | None = None,
    encoders: int | None = None,
) -> RowSource:
    """Read, encode and index ``source`` into a new generation at ``path``; nothing is published unless every
    step succeeds. Returns the row source (what was read, skipped and how)."""
    started = time.perf_counter()
    settings: dict[str, Any] = {
        "id_column": id_column, "title_column": title_column, "skip_bad_rows": skip_bad_rows, "chunksize": chunksize,
        "encoding": encoding,
    }  # fmt: skip
    rows: RowSource
    if engine == Engine.RAY:
        from matching.distributed import RaySource

        rows = RaySource(source, settings, encoder, address=ray_address, encoders=encoders)
    else:
        rows = LocalSource(CatalogueReader(source, **settings), encoder)
    total = len(source) if isinstance(source, pd.DataFrame) else None
    with new_generation(path, overwrite=overwrite, lock_timeout=lock_timeout) as gen:
        writer = Store.create(gen, encoder.dim)
        unknown = UnknownTokens(encoder)
        try:
            with tqdm(total=total, desc="encoding titles", unit="title", disable=not show_progress) as bar:
                for part in rows:
                    unknown.count(part.titles)
                    writer.append(part.ids, part.titles, part.metadata, part.vectors)
                    bar.update(len(part.ids))
        except BaseException:
            writer.abort()
            raise
        if rows.count == 0:
            writer.abort()
            raise BadRowError(
                f"{rows.name} has no usable rows ({rows.skipped} skipped); nothing was built. "
                "Add rows, or check id_column / title_column"
            )
        writer.finish(rows.id_type)
        encoded = time.perf_counter()
        built = generation.index_from_store(gen, index_config)
        indexed = time.perf_counter()
        lexical = generation.lexical_from_store(gen, analyzer)
        done = time.perf_counter()
        timings = {"read_and_encode": encoded - started, "index": indexed - encoded, "lexical": done - indexed}
        manifest = Manifest(
            library_version=__version__,
            encoder=generation.encoder_record(encoder),
            dim=encoder.dim,
            count=rows.count,
            index=generation.index_record(built, index_config),
            id_type=rows.id_type.value,
            source={
                "name": "DataFrame" if isinstance(source, pd.DataFrame) else str(source),
                "id_column": id_column,
                "title_columns": rows.title_columns,
                "skipped_rows": rows.skipped,
                "unknown_token_share": unknown.share,
                "build": {**rows.record(), "seconds": {k: round(v, 3) for k, v in timings.items()}},
            },
            lexical=generation.lexical_record(lexical, retrieval=(retrieval or Retrieval.HYBRID).value),
        )
        generation.finish(gen, manifest, index=built, lexical=lexical, scorer=Scorer(scorer_config))
    unknown.warn()
    return rows
