"""Building a bundle from a catalogue: rows are read and encoded here (engine ``local``) or on a Ray cluster
(engine ``ray``, :mod:`matching.distributed`); either way one generation is written by :mod:`matching.generation`."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from matching import __version__, generation, progress
from matching.analysis import Analyzer
from matching.bundle import Manifest, new_generation
from matching.config import IndexConfig, ScorerConfig
from matching.encoder import Encoder, UnknownTokens
from matching.errors import BadRowError
from matching.features import DEFAULT_DENSE_WEIGHT
from matching.fields import FieldSpec
from matching.ingest import CatalogueReader, Encoded, metadata_json
from matching.layout import ENCODER_WEIGHTS, TRAIN_REPORT
from matching.lexical.streamed import LexicalStream
from matching.scorer import Scorer
from matching.search import open_staged
from matching.store import Store, StoreWriter
from matching.types import Engine, Fusion, IdType, Retrieval

if TYPE_CHECKING:
    from matching.search import Snapshot
    from matching.training.loop import TrainReport

# trains a reranker on a snapshot of the generation it is given (``matching.training.scorer.train_scorer``)
Retrain = Callable[["Snapshot"], tuple[Scorer, "TrainReport"]]


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
            yield Encoded(chunk.ids, chunk.titles, [metadata_json(m) for m in chunk.metadata], vectors, chunk.metadata)
        self.count, self.skipped = self.reader.count, self.reader.skipped
        self.skipped_examples = self.reader.skipped_examples

    def record(self) -> dict[str, Any]:
        return {"engine": Engine.LOCAL.value, "files": len(self.reader.files)}


class StoreSource:
    """The live rows of a bundle's store, encoded anew (a re-encode: no CSV needed)."""

    def __init__(self, store: Store, encoder: Encoder, title_columns: list[str]) -> None:
        self.store = store
        self.encoder = encoder
        self.name = repr(str(store.directory))
        self.title_columns = title_columns
        self.count = self.skipped = 0
        self.skipped_examples: list[str] = []
        self._id_type = store.id_type

    @property
    def id_type(self) -> IdType:
        return self._id_type

    def __iter__(self) -> Iterator[Encoded]:
        for batch in self.store.rows():
            titles = [r.title for r in batch]
            vectors = self.encoder.encode_titles(titles)
            self.count += len(batch)
            metadata = [r.metadata for r in batch]
            yield Encoded(
                [r.external_id for r in batch], titles, [metadata_json(m) for m in metadata], vectors, metadata
            )

    def record(self) -> dict[str, Any]:
        return {"engine": Engine.LOCAL.value, "from_store": True}


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
    fields: FieldSpec | None = None,
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
        "id_column": id_column,
        "title_column": title_column,
        "skip_bad_rows": skip_bad_rows,
        "chunksize": chunksize,
        "encoding": encoding,
    }
    rows: RowSource
    if engine == Engine.RAY:
        from matching.distributed import RaySource

        rows = RaySource(source, settings, encoder, address=ray_address, encoders=encoders)
    else:
        rows = LocalSource(CatalogueReader(source, **settings), encoder)
    total = len(source) if isinstance(source, pd.DataFrame) else None
    name = "DataFrame" if isinstance(source, pd.DataFrame) else str(source)
    record = {"name": name, "id_column": id_column}
    return write_bundle(
        rows,
        path,
        encoder,
        record=record,
        total=total,
        index_config=index_config,
        scorer_config=scorer_config,
        analyzer=analyzer,
        retrieval=retrieval,
        overwrite=overwrite,
        show_progress=show_progress,
        lock_timeout=lock_timeout,
        started=started,
        fields=fields,
    )


def write_bundle(
    rows: RowSource,
    path: Path,
    encoder: Encoder,
    *,
    record: dict[str, Any],
    total: int | None,
    index_config: IndexConfig,
    scorer_config: ScorerConfig,
    analyzer: Analyzer,
    retrieval: Retrieval | None,
    overwrite: bool,
    show_progress: bool,
    lock_timeout: float,
    started: float,
    base: Path | None = None,
    fusion: dict[str, Any] | None = None,
    before_publish: Callable[[Path, Manifest], Manifest] | None = None,
    fields: FieldSpec | None = None,
) -> RowSource:
    """Write ``rows`` (encoded as they are read) into a new generation: the store, vectors, FAISS index, BM25 and
    an untrained reranker; with ``base``, the change is refused if another writer published since. A tuned
    encoder's weights (``Encoder.tuned``: they exist in no checkpoint directory) are saved too. ``fusion``: the
    manifest's fusion entries (default: the adaptive rule, centred on these vectors). ``before_publish`` is given
    the complete generation and its manifest, may add or replace files in it and returns the manifest to publish
    (checksummed again, over the final files)."""
    with new_generation(path, overwrite=overwrite, base=base, lock_timeout=lock_timeout) as gen:
        writer = Store.create(gen, encoder.dim, fields, hash_blocks=True)
        unknown = UnknownTokens(encoder)
        stream: LexicalStream | None = None
        try:
            stream = LexicalStream(analyzer)  # BM25 indexed beside the encoder (matching/lexical/streamed.py)
            vector_sum = _write_rows(rows, writer, stream, unknown, total=total, show_progress=show_progress)
            stream.flush()  # the last titles are indexed while the vector index is built
            writer.finish(rows.id_type)
            encoded = time.perf_counter()
            built = generation.index_from_store(gen, index_config)
            indexed = time.perf_counter()
            lexical = stream.finish(writer.count)
            done = time.perf_counter()
        finally:  # after a failure too: no thread or file left open
            try:
                if stream is not None:
                    stream.close()
            finally:
                writer.abort()
        timings = {"read_and_encode": encoded - started, "index": indexed - encoded, "lexical": done - indexed}
        entries = fusion or generation.adaptive_fusion(vector_sum)
        encoder_entry = generation.encoder_record(encoder)
        if encoder.tuned:
            encoder.save_weights(gen / ENCODER_WEIGHTS)
            encoder_entry["weights"] = ENCODER_WEIGHTS
        manifest = Manifest(
            library_version=__version__,
            encoder=encoder_entry,
            dim=encoder.dim,
            count=rows.count,
            index=generation.index_record(built, index_config),
            id_type=rows.id_type.value,
            source={
                **record,
                "title_columns": rows.title_columns,
                "skipped_rows": rows.skipped,
                "unknown_token_share": unknown.share,
                "build": {**rows.record(), "seconds": {k: round(v, 3) for k, v in timings.items()}},
            },
            lexical=generation.lexical_record(lexical, retrieval=(retrieval or Retrieval.HYBRID).value, fusion=entries),
        )
        blocks = writer.vector_blocks  # hashed as they were written
        scorer = Scorer(scorer_config)
        generation.finish(gen, manifest, index=built, lexical=lexical, scorer=scorer, vector_blocks=blocks)
        if before_publish is not None:
            generation.finish(gen, before_publish(gen, manifest), vector_blocks=blocks)  # the manifest again, last
    unknown.warn()
    return rows


def _write_rows(
    rows: RowSource,
    writer: StoreWriter,
    stream: LexicalStream,
    unknown: UnknownTokens,
    *,
    total: int | None,
    show_progress: bool,
) -> np.ndarray:
    """Append every encoded row to the store and hand its title to the BM25 stream; returns the vectors' sum
    (float64). A source without usable rows is a ``BadRowError``."""
    vector_sum = np.zeros(writer.dim, dtype=np.float64)
    with progress.bar(show_progress, total=total, desc="encoding titles", unit="title") as bar:
        for part in rows:
            unknown.count(part.titles)
            row_ids = writer.append(part.ids, part.titles, part.metadata, part.vectors, part.parsed)
            stream.add(row_ids, part.titles)
            vector_sum += np.asarray(part.vectors, dtype=np.float64).sum(axis=0)
            bar.update(len(part.ids))
    if rows.count == 0:
        raise BadRowError(
            f"{rows.name} has no usable rows ({rows.skipped} skipped); nothing was built. "
            "Add rows, or check id_column / title_column"
        )
    return vector_sum


def reencode_bundle(
    snap: Snapshot,
    path: Path,
    encoder: Encoder,
    *,
    index_config: IndexConfig | None,
    show_progress: bool,
    lock_timeout: float,
    finetuned: dict[str, Any] | None = None,
    retrain: Retrain | None = None,
) -> RowSource:
    """Encode the live titles of ``snap`` with ``encoder`` into one new generation of the bundle at ``path``:
    ids, titles, metadata and the BM25 settings stay; the reranker is reset and a query tower dropped (both were
    fitted to the old vectors), and the manifest says so. Refused if another writer published since ``snap``.
    ``finetuned`` (the fine-tune's report) is recorded in the manifest. With ``retrain``, the reranker is trained
    again on the new generation before it is published (:func:`retrained`): one generation, never a reset
    reranker in between."""
    started = time.perf_counter()
    manifest = snap.manifest
    old = snap.scorer.config
    lexical = manifest.lexical or {}
    # new vectors take today's adaptive rule (the manifest's entries too: generation.adaptive_fusion); a bundle from
    # before the adaptive rule keeps its fixed weight
    scorer_config = (
        generation.untrained_scorer(encoder.dim, old.hidden, Retrieval.HYBRID)
        if old.fusion is Fusion.ADAPTIVE
        else ScorerConfig(
            dim=encoder.dim,
            hidden=old.hidden,
            lexical=True,
            dense_weight=old.dense_weight if old.lexical else DEFAULT_DENSE_WEIGHT,
            dense_floor=old.dense_floor,
            fusion=old.fusion,
        )
    )
    kept = {k: v for k, v in manifest.source.items() if k in ("name", "id_column")}
    record = {
        **kept,
        "reencoded": {
            "from_fingerprint": manifest.encoder.get("fingerprint"),
            "scorer": "reset: the trained reranker scored the old encoder's vectors; train it again",
            "query_encoder": "dropped" if manifest.query_encoder else None,
            **({"finetuned": finetuned} if finetuned is not None else {}),
        },
    }
    rows = StoreSource(snap.store, encoder, list(manifest.source.get("title_columns", ["title"])))
    return write_bundle(
        rows,
        path,
        encoder,
        record=record,
        total=snap.store.count,
        index_config=index_config or IndexConfig(),
        scorer_config=scorer_config,
        analyzer=Analyzer(lexical.get("analyzer", Analyzer.AUTO)),
        retrieval=Retrieval(lexical["retrieval"]) if "retrieval" in lexical else None,
        overwrite=False,
        show_progress=show_progress,
        lock_timeout=lock_timeout,
        started=started,
        base=path / str(snap.generation),
        # the manifest's rule, not the reranker's (a bundle whose default retrieval is dense or lexical has an adaptive
        # retrieval fusion beside a fixed-weight reranker)
        fusion=None
        if lexical.get("fusion") == Fusion.ADAPTIVE
        else {**generation.fixed_fusion(), **_fixed_entries(lexical)},
        before_publish=None if retrain is None else functools.partial(retrained, encoder=encoder, fit=retrain),
        fields=snap.store.fields.spec if snap.store.fields is not None else None,
    )


def retrained(gen: Path, manifest: Manifest, *, encoder: Encoder, fit: Retrain) -> Manifest:
    """Train the reset reranker of the complete, unpublished generation ``gen`` (encoded by ``encoder``) on a
    snapshot of it with ``fit``; a learned form that wins replaces the reset one in ``gen`` (weights, config,
    training report). Returns ``manifest`` saying which was kept, with the reranker's report under ``finetuned``."""
    snap = open_staged(gen, encoder)
    try:
        scorer, report = fit(snap)
    finally:
        snap.handle.close()
    figures = f"held-out {report.metric}: " + ", ".join(f"{k} {v:.4f}" for k, v in report.compared.items())
    if report.chosen == "default":
        note = f"reset: retrained, but no learned form beat the untrained default, which stays ({figures})"
    else:  # the reset files were written for this generation alone (no hard links): overwritten in place
        scorer.save(gen)
        (gen / TRAIN_REPORT).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        note = f"retrained: {report.chosen} ({figures})"
    record = {**manifest.source["reencoded"], "scorer": note}
    if "finetuned" in record:
        record["finetuned"] = {**record["finetuned"], "scorer_report": report.to_dict()}
    return dataclasses.replace(manifest, source={**manifest.source, "reencoded": record})


def _fixed_entries(lexical: dict[str, Any]) -> dict[str, Any]:
    """A bundle from before the adaptive rule keeps its fixed dense weight through a re-encode."""
    return {"dense_weight": lexical.get("dense_weight", DEFAULT_DENSE_WEIGHT)}
