"""The facade: build a bundle from a catalogue, load it, search it."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from matching import __version__
from matching.autoindex import exact_top_k
from matching.bundle import (
    DEFAULT_LOCK_TIMEOUT,
    Lease,
    Manifest,
    check_target,
    collect_garbage,
    current_generation,
    lease_current,
    link_or_copy,
    live_name,
    new_generation,
    read_manifest,
    write_manifest,
)
from matching.config import EncoderConfig, IndexConfig, ScorerConfig
from matching.encoder import Encoder
from matching.errors import BadRowError, BundleError, ConfigError, DuplicateIdError, SchemaError
from matching.index import AUTO, INDEX_FILE, VectorIndex
from matching.index import CONFIG_FILE as INDEX_CONFIG_FILE
from matching.ingest import DEFAULT_CHUNKSIZE, CatalogueReader, canonical_id, metadata_json
from matching.scorer import Scorer
from matching.store import CONFIG_FILE as STORE_CONFIG_FILE
from matching.store import DB_FILE, VECTORS_FILE, Store, StoreEditor, Where, read_config
from matching.types import ChangeReport, ExternalId, IdType, Match, Preset

if TYPE_CHECKING:
    from matching.distill import DistillReport
    from matching.train import TrainReport

log = logging.getLogger(__name__)
TRAIN_REPORT_FILE = "train_report.json"
QUERY_TOWER_FILE = "query_encoder.safetensors"
# files a catalogue change rewrites; everything else in a generation (scorer, query tower) is carried
_CATALOGUE_FILES = frozenset({DB_FILE, VECTORS_FILE, STORE_CONFIG_FILE, INDEX_FILE, INDEX_CONFIG_FILE})
# a filter that leaves at most this many titles is searched exactly over their stored vectors
EXACT_FILTER_LIMIT = 20_000


class _Handle:
    """The releasable resources of one loaded generation (its store connections and reader lease)."""

    def __init__(self, store: Store, lease: Lease | None) -> None:
        self._finalizer = weakref.finalize(self, _release, store, lease)

    def close(self) -> None:
        self._finalizer()


def _release(store: Store, lease: Lease | None) -> None:
    store.close()
    if lease is not None:
        lease.release()


@dataclass(frozen=True, eq=False)
class _Snapshot:
    """One generation's parts. A search reads them all from one snapshot, so it never mixes two."""

    index: VectorIndex
    store: Store
    scorer: Scorer
    manifest: Manifest
    query_encoder: Encoder
    handle: _Handle
    generation: str | None


def _write_generation_manifest(gen: Path, manifest: Manifest) -> None:
    """Write the manifest; the shared, append-only vector file is checksummed over this generation's rows."""
    config = read_config(gen)
    write_manifest(gen, manifest, prefixes={VECTORS_FILE: config["rows"] * config["dim"] * 4})


def _encoder_record(encoder: Encoder) -> dict[str, Any]:
    return {
        "source": encoder.source,
        "fingerprint": encoder.fingerprint,
        "pooling": encoder.pooling.value,
        "max_length": encoder.max_length,
        "preset": encoder.preset.value,  # what the titles were encoded with; queries may use another
    }


class Matcher:
    """Two-tower matcher over one bundle: query encoder + FAISS index + store + reranker.

    Build with :meth:`build` or open with :meth:`load`; ``__init__`` only assembles built parts.
    """

    def __init__(
        self,
        encoder: Encoder,
        index: VectorIndex,
        store: Store,
        scorer: Scorer,
        manifest: Manifest,
        *,
        path: Path | None = None,
        query_encoder: Encoder | None = None,
        lease: Lease | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        if index.ntotal != store.count:
            raise BundleError(f"index holds {index.ntotal} vectors but the store {store.count} rows")
        if store.vectors.shape[1] != encoder.dim or scorer.config.dim != encoder.dim:
            raise BundleError(
                f"dimension mismatch: encoder {encoder.dim}, store {store.vectors.shape[1]}, scorer {scorer.config.dim}"
            )
        self.encoder = encoder
        self.path = path
        self.lock_timeout = lock_timeout
        self.allow_encoder_mismatch = False  # set by load(); kept for reloads after writes
        self._snap = _Snapshot(
            index,
            store,
            scorer,
            manifest,
            query_encoder or encoder,
            _Handle(store, lease),
            lease.generation.name if lease is not None else None,
        )

    # The parts of the generation this matcher serves; replaced together by refresh() and by writes.
    @property
    def index(self) -> VectorIndex:
        return self._snap.index

    @property
    def store(self) -> Store:
        return self._snap.store

    @property
    def manifest(self) -> Manifest:
        return self._snap.manifest

    @property
    def scorer(self) -> Scorer:
        return self._snap.scorer

    @scorer.setter
    def scorer(self, scorer: Scorer) -> None:
        self._snap = dataclasses.replace(self._snap, scorer=scorer)

    @property
    def query_encoder(self) -> Encoder:
        return self._snap.query_encoder

    @query_encoder.setter
    def query_encoder(self, encoder: Encoder) -> None:
        self._snap = dataclasses.replace(self._snap, query_encoder=encoder)

    @property
    def generation(self) -> str | None:
        """The name of the bundle generation being served (``None`` for an unsaved matcher)."""
        return self._snap.generation

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        source: str | Path | pd.DataFrame,
        path: str | Path,
        *,
        id_column: str = "id",
        title_column: str | Sequence[str] = "title",
        model: str | Path | None = None,
        encoder: Encoder | None = None,
        encoder_config: EncoderConfig | None = None,
        preset: Preset | str | None = None,
        index_config: IndexConfig | None = None,
        scorer_hidden: int = 256,
        skip_bad_rows: bool = False,
        encoding: str = "utf-8",
        chunksize: int = DEFAULT_CHUNKSIZE,
        overwrite: bool = False,
        show_progress: bool = True,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> Matcher:
        """Encode every title of ``source`` (CSV/TSV/JSONL path or DataFrame) into a new bundle at ``path``.

        ``title_column`` may name several columns; their values are joined with a space.
        Every other column is kept as metadata. ``preset`` picks the encoder's speed/precision
        (:class:`~matching.types.Preset`; default ``default``). ``index_config`` defaults to the automatic
        index for the catalogue's size. Nothing is published unless the whole build succeeds.
        """
        path = Path(path)
        check_target(path, overwrite=overwrite)
        if encoder is None:
            cfg = encoder_config or EncoderConfig()
            if model is not None:
                cfg = dataclasses.replace(cfg, model=str(model))
            if preset is not None:
                cfg = dataclasses.replace(cfg, preset=Preset(preset))
            encoder = Encoder.from_pretrained(cfg)
        elif preset is not None:
            encoder.set_preset(preset)
        index_config = index_config or IndexConfig()
        # fail on a bad index or scorer setting now, not after encoding the whole catalogue
        VectorIndex.empty(encoder.dim, index_config)
        scorer_config = ScorerConfig(dim=encoder.dim, hidden=scorer_hidden)
        reader = CatalogueReader(
            source,
            id_column=id_column,
            title_column=title_column,
            skip_bad_rows=skip_bad_rows,
            chunksize=chunksize,
            encoding=encoding,
        )
        total = len(source) if isinstance(source, pd.DataFrame) else None
        with new_generation(path, overwrite=overwrite, lock_timeout=lock_timeout) as gen:
            writer = Store.create(gen, encoder.dim)
            try:
                with tqdm(total=total, desc="encoding titles", unit="title", disable=not show_progress) as bar:
                    for chunk in reader:
                        vectors = encoder.encode_titles(chunk.titles)
                        writer.append(chunk.ids, chunk.titles, map(metadata_json, chunk.metadata), vectors)
                        bar.update(len(chunk))
            except BaseException:
                writer.abort()
                raise
            if reader.count == 0:
                writer.abort()
                raise BadRowError(
                    f"{reader.name} has no usable rows ({reader.skipped} skipped); nothing was built. "
                    "Add rows, or check id_column / title_column"
                )
            writer.finish(reader.id_type)
            store = Store.open(gen)
            try:
                ids = np.arange(store.count, dtype=np.int64)
                built = VectorIndex.build(store.vectors, ids, index_config)
                built.save(gen)
            finally:
                store.close()
            Scorer(scorer_config).save(gen)
            manifest = Manifest(
                library_version=__version__,
                encoder=_encoder_record(encoder),
                dim=encoder.dim,
                count=reader.count,
                index=_index_record(built, index_config),
                id_type=reader.id_type.value,
                source={
                    "name": "DataFrame" if isinstance(source, pd.DataFrame) else str(source),
                    "id_column": id_column,
                    "title_columns": reader.title_columns,
                    "skipped_rows": reader.skipped,
                },
            )
            _write_generation_manifest(gen, manifest)
        if reader.skipped:
            log.warning("skipped %d bad row(s), e.g. %s", reader.skipped, "; ".join(reader.skipped_examples))
        return cls.load(path, encoder=encoder, verify=False, lock_timeout=lock_timeout)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        model: str | Path | None = None,
        encoder: Encoder | None = None,
        device: str | None = None,
        preset: Preset | str | None = None,
        verify: bool = True,
        allow_encoder_mismatch: bool = False,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> Matcher:
        """Open the live generation of the bundle at ``path``.

        The encoder is loaded from where the manifest says it came from unless ``model``/``encoder``
        is given; either way its fingerprint must match the one the titles were encoded with.
        ``preset`` sets the encoder's speed/precision for queries and later additions (default: the one
        the bundle was built with); every preset of one checkpoint shares the vector space.
        The generation stays on disk while this matcher uses it, even if writers publish newer ones
        (see :meth:`refresh`). ``lock_timeout`` is how long this matcher's writes wait for another writer.
        """
        path = Path(path)
        lease = lease_current(path)
        try:
            return cls._load(path, lease, model, encoder, device, preset, verify, allow_encoder_mismatch, lock_timeout)
        except BaseException:
            lease.release()
            raise

    @classmethod
    def _load(
        cls,
        path: Path,
        lease: Lease,
        model: str | Path | None,
        encoder: Encoder | None,
        device: str | None,
        preset: Preset | str | None,
        verify: bool,
        allow_encoder_mismatch: bool,
        lock_timeout: float,
    ) -> Matcher:
        gen = lease.generation
        manifest = read_manifest(gen, verify=verify)
        if encoder is None:
            record = manifest.encoder
            encoder = Encoder.from_pretrained(
                EncoderConfig(
                    model=str(model) if model is not None else record["source"],
                    pooling=record["pooling"],
                    max_length=record["max_length"],
                    device=device,
                    preset=Preset(preset or record.get("preset") or EncoderConfig().preset),
                )
            )
        elif preset is not None:
            encoder.set_preset(preset)
        if encoder.fingerprint != manifest.encoder["fingerprint"] and not allow_encoder_mismatch:
            raise BundleError(
                f"the encoder ({encoder.source}) is not the one bundle {str(path)!r} was built with "
                f"(fingerprint {encoder.fingerprint[:12]} != {manifest.encoder['fingerprint'][:12]}); "
                "load the same model, or pass allow_encoder_mismatch=True if you know they are compatible"
            )
        query_encoder = None
        if manifest.query_encoder:
            query_encoder = encoder.clone(source=f"query tower in {path}")
            query_encoder.load_weights(gen / QUERY_TOWER_FILE)
            if query_encoder.fingerprint != manifest.query_encoder["fingerprint"]:
                raise BundleError(f"the query tower in {str(gen)!r} does not match its manifest fingerprint")
        index = VectorIndex.load(gen)
        scorer = Scorer.load(gen).to(encoder.device)
        store = Store.open(gen)
        try:
            matcher = cls(
                encoder,
                index,
                store,
                scorer,
                manifest,
                path=path,
                query_encoder=query_encoder,
                lease=lease,
                lock_timeout=lock_timeout,
            )
        except BaseException:
            store.close()
            raise
        matcher.allow_encoder_mismatch = allow_encoder_mismatch
        return matcher

    def close(self) -> None:
        """Release the store's database connections and this matcher's hold on its generation."""
        self._snap.handle.close()

    def refresh(self) -> bool:
        """Switch to the bundle's live generation if a writer published a newer one; ``True`` if it did.

        Searches already running finish on the generation they started with.
        """
        if self.path is None or live_name(self.path) == self.generation:
            return False
        self._reopen(collect=False)
        return True

    def __enter__(self) -> Matcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.store.count

    def __repr__(self) -> str:
        return f"Matcher(path={str(self.path)!r}, count={len(self)}, index={self.manifest.factory!r})"

    # -- search ----------------------------------------------------------------------------------

    def search(
        self, query: str, k: int = 10, *, candidates: int = 100, rerank: bool = True, where: Where | None = None
    ) -> list[Match]:
        """The ``k`` best titles for ``query``: FAISS retrieves ``candidates``, the scorer reranks them.

        ``where`` filters on metadata inside retrieval, e.g. ``{"brand": "acme", "price": ("<", 50)}``
        (see :func:`matching.store.where_clauses`), so ``k`` hits come back whenever ``k`` titles match.
        """
        return self.search_batch([query], k, candidates=candidates, rerank=rerank, where=where)[0]

    def search_batch(
        self,
        queries: Sequence[str],
        k: int = 10,
        *,
        candidates: int = 100,
        rerank: bool = True,
        show_progress: bool = False,
        where: Where | None = None,
    ) -> list[list[Match]]:
        """:meth:`search` for many queries, encoded in one pass."""
        if isinstance(queries, str):
            raise ConfigError("search_batch takes a list of queries; use search() for one string")
        bad = [i for i, q in enumerate(queries) if not isinstance(q, str)]
        if bad:
            raise ConfigError(f"queries must be strings; item {bad[0]} is {type(queries[bad[0]]).__name__}")
        snap = self._snap
        vectors = snap.query_encoder.encode_queries(list(queries), show_progress=show_progress)
        return self._search(snap, vectors, k, candidates, rerank, where)

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 10,
        *,
        candidates: int = 100,
        rerank: bool = True,
        where: Where | None = None,
    ) -> list[list[Match]]:
        """Search with already encoded query vectors ``(n, dim)``."""
        return self._search(self._snap, vectors, k, candidates, rerank, where)

    def _search(
        self, snap: _Snapshot, vectors: np.ndarray, k: int, candidates: int, rerank: bool, where: Where | None
    ) -> list[list[Match]]:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        retrieval, ids = _retrieve(snap, vectors, max(k, candidates), where)
        store = snap.store
        ranked: list[list[tuple[int, float, float]]] = []
        for qi in range(len(vectors)):
            keep = ids[qi] >= 0
            cand_ids, cand_scores = ids[qi][keep], retrieval[qi][keep]
            if rerank and len(cand_ids):
                scores = snap.scorer.score(vectors[qi : qi + 1], store.vectors[cand_ids])
            else:
                scores = cand_scores
            order = np.argsort(-scores, kind="stable")[:k]
            ranked.append([(int(cand_ids[j]), float(scores[j]), float(cand_scores[j])) for j in order])
        rows = {r.row_id: r for r in store.get([rid for hits in ranked for rid, _, _ in hits])}
        return [
            [
                Match(
                    id=store.external_id(rows[rid].external_id),
                    title=rows[rid].title,
                    score=score,
                    retrieval_score=retr,
                    metadata=rows[rid].metadata,
                )
                for rid, score, retr in hits
            ]
            for hits in ranked
        ]

    # -- catalogue changes -----------------------------------------------------------------------

    def add(
        self,
        source: str | Path | pd.DataFrame,
        *,
        id_column: str | None = None,
        title_column: str | Sequence[str] | None = None,
        skip_bad_rows: bool = False,
        encoding: str = "utf-8",
        chunksize: int = DEFAULT_CHUNKSIZE,
        show_progress: bool = True,
        allow_encoder_mismatch: bool = False,
    ) -> ChangeReport:
        """Add new titles (CSV/TSV/JSONL path or DataFrame); an id already in the bundle is an error.

        Only the new titles are encoded. Columns default to those the bundle was built with. The change
        is published atomically as a new generation, which this matcher then serves.
        """
        return self._change(
            "add", source, id_column, title_column, skip_bad_rows, encoding, chunksize, show_progress,
            allow_encoder_mismatch,
        )  # fmt: skip

    def upsert(
        self,
        source: str | Path | pd.DataFrame,
        *,
        id_column: str | None = None,
        title_column: str | Sequence[str] | None = None,
        skip_bad_rows: bool = False,
        encoding: str = "utf-8",
        chunksize: int = DEFAULT_CHUNKSIZE,
        show_progress: bool = True,
        allow_encoder_mismatch: bool = False,
    ) -> ChangeReport:
        """Add new titles and replace existing ones (same id): a changed title is re-encoded, changed
        metadata alone is just rewritten, and an identical row is left as it is."""
        return self._change(
            "upsert", source, id_column, title_column, skip_bad_rows, encoding, chunksize, show_progress,
            allow_encoder_mismatch,
        )  # fmt: skip

    def remove(self, ids: Iterable[ExternalId], *, missing_ok: bool = False) -> ChangeReport:
        """Remove titles by external id; an unknown id is an error unless ``missing_ok``."""
        if isinstance(ids, str | int):
            ids = [ids]
        wanted: list[str] = []
        for i, raw in enumerate(ids):
            ext = canonical_id(raw)
            if ext is None:
                raise ConfigError(f"ids[{i}] is empty; pass the external ids to remove")
            wanted.append(ext)
        started = time.perf_counter()
        path = self._require_path()
        with new_generation(path, change=True, lock_timeout=self.lock_timeout) as gen:
            live, manifest = _live(path)
            editor = StoreEditor(live, gen)
            try:
                found = editor.lookup(wanted)
                missing = [e for e in dict.fromkeys(wanted) if e not in found]
                if missing and not missing_ok:
                    raise BadRowError(
                        f"{len(missing)} id(s) to remove are not in the bundle, e.g. {missing[:3]}; "
                        "pass missing_ok=True (--missing-ok) to ignore them"
                    )
                dead = np.asarray(sorted(r.row_id for r in found.values()), dtype=np.int64)
                editor.delete(dead.tolist())
            except BaseException:
                editor.abort()
                raise
            count = editor.finish()
            index = VectorIndex.load(live)
            self._finish_change(live, gen, manifest, index, dead, np.empty((0, 0), np.float32), np.empty(0, np.int64))
            _write_generation_manifest(gen, _changed(manifest, count))
        self._reopen()
        return ChangeReport(
            "remove", removed=len(dead), missing=len(missing), count=count,
            generation=self.generation or "", seconds=time.perf_counter() - started,
        )  # fmt: skip

    def compact(self, *, index_config: IndexConfig | None = None, show_progress: bool = True) -> ChangeReport:
        """Rewrite the bundle without the rows removed titles left behind, and rebuild the index from the
        stored vectors (no re-encoding), with ``index_config`` if given."""
        started = time.perf_counter()
        path = self._require_path()
        with new_generation(path, change=True, lock_timeout=self.lock_timeout) as gen:
            live, manifest = _live(path)
            config = index_config or _compact_config(live, manifest)

            old = Store.open(live)
            try:
                writer = Store.create(gen, old.dim)
                try:
                    with tqdm(total=old.count, desc="compacting", unit="title", disable=not show_progress) as bar:
                        for rows in old.rows():
                            writer.copy_rows(old, rows)
                            bar.update(len(rows))
                except BaseException:
                    writer.abort()
                    raise
                writer.finish(old.id_type)
            finally:
                old.close()
            _carry(live, gen, manifest)
            store = Store.open(gen)
            try:
                built = VectorIndex.build(store.vectors, np.arange(store.count, dtype=np.int64), config)
                built.save(gen)
                count = store.count
            finally:
                store.close()
            _write_generation_manifest(
                gen, dataclasses.replace(_changed(manifest, count), index=_index_record(built, config))
            )
        self._reopen()
        return ChangeReport("compact", count=count, generation=self.generation or "",
                            seconds=time.perf_counter() - started)  # fmt: skip

    def _change(
        self,
        operation: str,
        source: str | Path | pd.DataFrame,
        id_column: str | None,
        title_column: str | Sequence[str] | None,
        skip_bad_rows: bool,
        encoding: str,
        chunksize: int,
        show_progress: bool,
        allow_encoder_mismatch: bool,
    ) -> ChangeReport:
        started = time.perf_counter()
        path = self._require_path()
        built_with = self.manifest.source
        reader = CatalogueReader(
            source,
            id_column=id_column or built_with.get("id_column", "id"),
            title_column=title_column or built_with.get("title_columns", "title"),
            skip_bad_rows=skip_bad_rows,
            chunksize=chunksize,
            encoding=encoding,
        )
        tally = dict.fromkeys(("added", "updated", "metadata_updated", "unchanged", "encoded"), 0)
        with new_generation(path, change=True, lock_timeout=self.lock_timeout) as gen:
            live, manifest = _live(path)
            if manifest.encoder["fingerprint"] != self.encoder.fingerprint and not allow_encoder_mismatch:
                raise BundleError(
                    f"bundle {str(path)!r} was built with another encoder (fingerprint "
                    f"{manifest.encoder['fingerprint'][:12]}, this one {self.encoder.fingerprint[:12]}): titles "
                    "encoded by it would not be comparable; load the bundle with its own encoder, or pass "
                    "allow_encoder_mismatch=True"
                )
            editor = StoreEditor(live, gen)
            dead: list[int] = []
            new_ids: list[np.ndarray] = []
            new_vectors: list[np.ndarray] = []
            dead_before = 0
            try:
                desc = f"{operation}: encoding titles"
                with tqdm(desc=desc, unit="title", disable=not show_progress) as bar:
                    for chunk in reader:
                        existing = editor.lookup(chunk.ids)
                        if editor.id_type is IdType.INT:
                            _check_int_ids(chunk.ids, chunk.rows, reader.name)
                        fresh: list[int] = []
                        meta_changes: dict[int, str] = {}
                        for j, ext in enumerate(chunk.ids):
                            old = existing.get(ext)
                            meta = metadata_json(chunk.metadata[j])
                            if old is None:
                                fresh.append(j)
                                tally["added"] += 1
                            elif operation == "add":
                                raise DuplicateIdError(
                                    f"{reader.name} row {chunk.rows[j]}: id {ext!r} is already in the bundle; "
                                    "use upsert to replace it"
                                )
                            elif old.title != chunk.titles[j]:
                                dead.append(old.row_id)
                                fresh.append(j)
                                tally["updated"] += 1
                            elif old.metadata != json.loads(meta):  # as values: key order does not matter
                                meta_changes[old.row_id] = meta
                                tally["metadata_updated"] += 1
                            else:
                                tally["unchanged"] += 1
                        editor.update_metadata(meta_changes)
                        editor.delete(dead[dead_before:])  # before their new versions take the same external ids
                        dead_before = len(dead)
                        if fresh:
                            titles = [chunk.titles[j] for j in fresh]
                            vectors = self.encoder.encode_titles(titles)
                            row_ids = editor.append(
                                [chunk.ids[j] for j in fresh],
                                titles,
                                [metadata_json(chunk.metadata[j]) for j in fresh],
                                vectors,
                            )
                            new_ids.append(row_ids)
                            new_vectors.append(vectors)
                            tally["encoded"] += len(fresh)
                        bar.update(len(chunk))
                if reader.count == 0:
                    raise BadRowError(f"{reader.name} has no usable rows ({reader.skipped} skipped); nothing changed")
            except BaseException:
                editor.abort()
                raise
            count = editor.finish()
            index = VectorIndex.load(live)
            dim = self.encoder.dim
            self._finish_change(
                live,
                gen,
                manifest,
                index,
                np.asarray(dead, dtype=np.int64),
                np.concatenate(new_vectors) if new_vectors else np.empty((0, dim), np.float32),
                np.concatenate(new_ids) if new_ids else np.empty(0, np.int64),
            )
            _write_generation_manifest(gen, _changed(manifest, count))
        if reader.skipped:
            log.warning("skipped %d bad row(s), e.g. %s", reader.skipped, "; ".join(reader.skipped_examples))
        self._reopen()
        return ChangeReport(
            operation, **tally, count=count, generation=self.generation or "",
            seconds=time.perf_counter() - started,
        )  # fmt: skip

    def _finish_change(
        self,
        live: Path,
        gen: Path,
        manifest: Manifest,
        index: VectorIndex,
        dead: np.ndarray,
        vectors: np.ndarray,
        ids: np.ndarray,
    ) -> None:
        """Apply removals and additions to the index (rebuilding it where FAISS cannot remove), carry
        the unchanged components across, and save."""
        if not index.remove(dead):
            store = Store.open(gen)
            try:
                live_ids = store.live_ids()
                index = VectorIndex.build(store.vectors[live_ids], live_ids, index.config, tune=False)
            finally:
                store.close()
        else:
            index.add(vectors, ids)
        index.save(gen)
        _carry(live, gen, manifest)

    # -- pair scoring ----------------------------------------------------------------------------

    def encode_pairs(
        self, queries: Sequence[str], titles: Sequence[str], *, show_progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Query and title vectors for aligned pairs.

        Each distinct query is encoded once. Titles already in the bundle (exact text) reuse their cached
        vectors; only unseen titles are encoded.
        """
        if len(queries) != len(titles):
            raise ConfigError(f"queries and titles differ in length ({len(queries)} != {len(titles)})")
        for name, seq in (("queries", queries), ("titles", titles)):
            bad = next((i for i, x in enumerate(seq) if not isinstance(x, str)), None)
            if bad is not None:
                raise ConfigError(f"{name}[{bad}] is {type(seq[bad]).__name__}, not a string")
        snap = self._snap  # one generation throughout, even if another thread refreshes
        uq = list(dict.fromkeys(queries))
        q_vecs = snap.query_encoder.encode_queries(uq, show_progress=show_progress)
        q_pos = {q: i for i, q in enumerate(uq)}
        ut = list(dict.fromkeys(titles))
        rows = snap.store.find_titles(ut)
        t_vecs = np.empty((len(ut), self.encoder.dim), dtype=np.float32)
        cached = [(i, r) for i, r in enumerate(rows) if r is not None]
        if cached:
            t_vecs[[i for i, _ in cached]] = snap.store.vectors[[r for _, r in cached]]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            t_vecs[missing] = self.encoder.encode_titles([ut[i] for i in missing], show_progress=show_progress)
        t_pos = {t: i for i, t in enumerate(ut)}
        return q_vecs[[q_pos[q] for q in queries]], t_vecs[[t_pos[t] for t in titles]]

    def score_pairs(self, queries: Sequence[str], titles: Sequence[str]) -> np.ndarray:
        """The reranker's score for each (query, title) pair, as a float32 array in input order."""
        q, t = self.encode_pairs(queries, titles)
        return self.scorer.score(q, t)

    # -- training --------------------------------------------------------------------------------

    def replace_scorer(self, scorer: Scorer, report: dict[str, Any] | None = None) -> None:
        """Publish ``scorer`` (and its training report) as a new bundle generation; search uses it next."""
        if scorer.config.dim != self.encoder.dim:
            raise ConfigError(f"scorer dimension {scorer.config.dim} != encoder dimension {self.encoder.dim}")

        def write(gen: Path) -> None:
            scorer.save(gen)
            if report is not None:
                (gen / TRAIN_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

        self._publish(("scorer", TRAIN_REPORT_FILE), write, self.manifest)

    def replace_query_encoder(self, tower: Encoder, report: dict[str, Any] | None = None) -> None:
        """Publish a fine-tuned query tower (same architecture as the title encoder) into the bundle.

        Titles stay as they were encoded; only queries are encoded by ``tower`` from then on.
        """
        if tower.dim != self.encoder.dim:
            raise ConfigError(f"query tower dimension {tower.dim} != title encoder dimension {self.encoder.dim}")
        record = {"fingerprint": tower.fingerprint, "base": self.encoder.fingerprint, "report": report}

        def write(gen: Path) -> None:
            tower.save_weights(gen / QUERY_TOWER_FILE)

        self._publish((QUERY_TOWER_FILE,), write, dataclasses.replace(self.manifest, query_encoder=record))

    def _publish(self, replaced: tuple[str, ...], write: Any, manifest: Manifest) -> None:
        """Write a new generation that carries every file but those starting with ``replaced``.

        Refused if another writer published since this matcher loaded: the change was made against
        this matcher's generation (its scorer was trained on that catalogue).
        """
        path = self._require_path()
        keep = [n for n in self.manifest.files if not n.startswith(replaced)]
        base = current_generation(path) if self.generation is None else path / self.generation
        with new_generation(path, carry=keep, base=base, lock_timeout=self.lock_timeout) as gen:
            write(gen)
            _write_generation_manifest(gen, dataclasses.replace(manifest, files={}))
        self._reopen()

    def _require_path(self) -> Path:
        if self.path is None:
            raise BundleError("this matcher has no bundle path to save into")
        return self.path

    def _reopen(self, *, collect: bool = True) -> None:
        """Serve the bundle's live generation (after a write, or a refresh); a writer also deletes the
        generations no reader holds any more."""
        fresh = Matcher.load(
            self._require_path(),
            encoder=self.encoder,
            verify=False,
            lock_timeout=self.lock_timeout,
            allow_encoder_mismatch=self.allow_encoder_mismatch,
        )
        old, self._snap = self._snap, fresh._snap
        del old  # its lease goes when the last search using it finishes
        if collect:
            collect_garbage(self._require_path())

    def train_scorer(
        self,
        train_pairs: pd.DataFrame | str | Path,
        valid_pairs: pd.DataFrame | str | Path | None = None,
        *,
        save: bool = True,
        show_progress: bool = True,
        **settings: Any,
    ) -> TrainReport:
        """Train the reranker on (query, title, label) pairs; settings: :class:`matching.train.TrainConfig`.

        The best checkpoint on the validation metric is kept (never worse than the scorer it started from)
        and, with ``save``, published into the bundle.
        """
        from matching.train import train_scorer

        scorer, report = train_scorer(self, train_pairs, valid_pairs, show_progress=show_progress, **settings)
        if save:
            self.replace_scorer(scorer, report.to_dict())
        else:
            self.scorer = scorer
        return report

    def train_query_tower(
        self,
        train_pairs: pd.DataFrame | str | Path,
        valid_pairs: pd.DataFrame | str | Path | None = None,
        *,
        save: bool = True,
        show_progress: bool = True,
        **settings: Any,
    ) -> TrainReport:
        """Fine-tune a separate query tower on positive pairs; settings: :class:`matching.tower.TowerConfig`.

        The title vectors stay frozen. Retrain the scorer afterwards (:meth:`train_scorer`): it was fitted to
        the old query vectors.
        """
        from matching.tower import train_query_tower

        tower, report = train_query_tower(self, train_pairs, valid_pairs, show_progress=show_progress, **settings)
        if save:
            self.replace_query_encoder(tower, report.to_dict())
        else:
            self.query_encoder = tower
        return report

    # -- a smaller encoder -------------------------------------------------------------------------

    def distill(
        self,
        out_dir: str | Path,
        *,
        layers: int = 3,
        max_titles: int = 100_000,
        show_progress: bool = True,
        **settings: Any,
    ) -> DistillReport:
        """Train a ``layers``-layer student of the title encoder on (up to ``max_titles`` of) this bundle's own
        titles and save it as a checkpoint in ``out_dir``; settings: :func:`matching.distill.distill`.

        The student encodes into its own vector space: build a bundle with it (``model=out_dir``, e.g. from
        :meth:`catalogue`) rather than mixing it with vectors of the original encoder.
        """
        from matching.distill import distill

        titles = [r.title for rows in self.store.rows() for r in rows]
        if len(titles) > max_titles:
            pick = np.random.default_rng(settings.get("seed", 0)).choice(len(titles), max_titles, replace=False)
            titles = [titles[i] for i in np.sort(pick)]
        return distill(self.encoder, titles, out_dir, layers=layers, show_progress=show_progress, **settings)

    def catalogue(self) -> pd.DataFrame:
        """Every live title as a DataFrame: ``id``, ``title`` and one column per metadata field."""
        store = self.store
        records = [
            {**r.metadata, "id": store.external_id(r.external_id), "title": r.title}
            for rows in store.rows()
            for r in rows
        ]
        frame = pd.DataFrame.from_records(records)
        if frame.empty:
            return pd.DataFrame({"id": [], "title": []})
        return frame[["id", "title", *[c for c in frame.columns if c not in ("id", "title")]]]

    # -- description -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The manifest, plus the bundle path, as a JSON-able dict."""
        return {"path": str(self.path) if self.path else None, **self.manifest.to_dict()}


def _index_record(index: VectorIndex, requested: IndexConfig | None = None) -> dict[str, Any]:
    """The manifest's index entry: the resolved config, what build-time tuning measured, and the factory
    asked for (``auto`` is re-resolved for the new size when the bundle is compacted)."""
    record = index.config.to_dict()
    if index.tuning:
        record["tuning"] = index.tuning
    if requested is not None:
        record["requested_factory"] = requested.factory
    return record


def _compact_config(live: Path, manifest: Manifest) -> IndexConfig:
    """The index a compaction rebuilds: ``auto`` again if the bundle asked for it, else the same factory;
    the search parameter is tuned again unless it was fixed by the user (no target recall)."""
    current = IndexConfig.load(live / INDEX_CONFIG_FILE)
    if manifest.index.get("requested_factory") == AUTO:
        return dataclasses.replace(current, factory=AUTO, nprobe=None, ef_search=None, refine_factor=None)
    if current.target_recall and manifest.index.get("tuning"):
        return dataclasses.replace(current, nprobe=None, ef_search=None)
    return current


def _live(path: Path) -> tuple[Path, Manifest]:
    """The live generation and its manifest (call with the writer lock held)."""
    live = current_generation(path)
    return live, read_manifest(live, verify=False)


def _carry(live: Path, gen: Path, manifest: Manifest) -> None:
    """Bring the files a catalogue change does not touch (scorer, query tower, reports) across."""
    for name in manifest.files:
        if name not in _CATALOGUE_FILES:
            link_or_copy(live / name, gen / name)


def _changed(manifest: Manifest, count: int) -> Manifest:
    return dataclasses.replace(
        manifest,
        count=count,
        library_version=__version__,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        files={},
    )


def _check_int_ids(ids: Sequence[str], rows: Sequence[int], name: str) -> None:
    for ext, row in zip(ids, rows, strict=True):
        if canonical_id(_as_int(ext)) != ext:
            raise SchemaError(
                f"{name} row {row}: id {ext!r} is not an integer, but every id in this bundle is; "
                "use integer ids, or rebuild the bundle with string ids"
            )


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _retrieve(snap: _Snapshot, vectors: np.ndarray, depth: int, where: Where | None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``depth`` (scores, row ids) per query, restricted to titles matching ``where``."""
    stored = snap.store.vectors
    if where is None:
        return snap.index.search(vectors, depth, stored=stored)
    allowed = snap.store.filter_ids(where)
    if len(allowed) <= EXACT_FILTER_LIMIT:
        return _exact(vectors, stored, allowed, depth)
    mask = np.zeros(stored.shape[0], dtype=bool)
    mask[allowed] = True
    try:
        scores, ids = snap.index.search(vectors, depth, allowed=mask, stored=stored)
    except NotImplementedError:
        return _exact(vectors, stored, allowed, depth)
    # an approximate index can come back short under a selective filter: search those queries exactly
    short = np.flatnonzero((ids >= 0).sum(axis=1) < min(ids.shape[1], len(allowed)))
    if len(short):
        scores[short], ids[short] = _exact(vectors[short], stored, allowed, ids.shape[1])
    return scores, ids


class _Subset:
    """The stored vectors of ``row_ids``, sliced as one matrix (read block by block by ``exact_top_k``)."""

    def __init__(self, stored: np.ndarray, row_ids: np.ndarray) -> None:
        self.stored, self.row_ids = stored, row_ids

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.stored[self.row_ids[rows]], dtype=np.float32)


def _exact(queries: np.ndarray, stored: np.ndarray, row_ids: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top ``depth`` over the stored vectors of ``row_ids``, padded with -1."""
    scores = np.full((len(queries), depth), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), depth), -1, dtype=np.int64)
    if len(row_ids):
        top_scores, positions = exact_top_k(_Subset(stored, row_ids), queries, depth)  # type: ignore[arg-type]
        scores[:, : top_scores.shape[1]] = top_scores
        ids[:, : positions.shape[1]] = row_ids[positions]
    return scores, ids
