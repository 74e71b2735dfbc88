"""Catalogue changes as functions over (bundle path, encoder): add, upsert, remove and compact. Each reads the
live generation under the writer lock, writes a staging generation, and publishes it through
:mod:`matching.generation`; only new or changed titles are encoded."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import sqlalchemy.exc

from matching import generation, progress
from matching.analysis import Analyzer
from matching.bundle import Manifest, Unchanged, current_generation, new_generation, read_manifest
from matching.checksums import verify_files
from matching.config import IndexConfig
from matching.delta import fold_limit, load_index, load_lexical
from matching.editors import DeltaEditor, StoreEditor, delta_size
from matching.encoder import Encoder
from matching.errors import BadRowError, BundleError, ConfigError, DuplicateIdError, SchemaError
from matching.ingest import CatalogueReader, Chunk, canonical_id, metadata_json
from matching.layout import (
    CATALOGUE_FILES,
    INDEX_CONFIG,
    LEXICAL_CONFIG,
    STORE_CONFIG,
    STORE_DB,
    STORE_DELTA,
    VECTORS_FILE,
)
from matching.lexical import lexical_files
from matching.store import Store, StoredTitle, read_config
from matching.types import ChangeReport, ExternalId, IdType
from matching.vectors import VectorIndex, index_files

if TYPE_CHECKING:
    from matching.search import Snapshot

log = logging.getLogger(__name__)


def _live(path: Path, *, whole: bool = False, fold: bool = False) -> tuple[Path, Manifest, bool]:
    """The live generation, its manifest, and whether the change is kept as a delta (call with the writer lock
    held; ``whole`` (compaction) and ``fold`` write whole files), its catalogue files checked: the ones the change
    rewrites (a damaged one would be blessed by the new manifest). Of the append-only vector file only the last
    block is checked, unless ``whole`` (compaction copies every row); the other files are carried with their
    digests, so damage there is still seen by a verified load."""
    live = current_generation(path)
    manifest = read_manifest(live, verify=False)
    first = [n for n in manifest.files if n in _DECIDING]  # what the choice reads: checked before it
    verify_files(live, manifest, first)
    delta = not (whole or fold) and _keeps_delta(live)
    rewritten = _DELTA_WRITES if delta else CATALOGUE_FILES | index_files() | lexical_files()
    rest = [n for n in manifest.files if n in rewritten and n not in first]
    verify_files(live, manifest, rest, last_block_only=not whole)
    return live, manifest, delta


# what a change kept as a delta writes; it carries every other file
_DELTA_WRITES = frozenset({STORE_DELTA, STORE_CONFIG, VECTORS_FILE})
_DECIDING = frozenset({STORE_DELTA, STORE_CONFIG, INDEX_CONFIG})


def _keeps_delta(live: Path) -> bool:
    """Whether a change to ``live`` goes into its delta: the bundle has BM25 postings and an index that can remove
    rows (not an HNSW graph, a refined PQ...: the change rebuilds those), and the delta is within its fold limit."""
    if not (live / LEXICAL_CONFIG).is_file():
        return False
    config = read_config(live)
    return VectorIndex.removes(config["dim"], IndexConfig.load(live / INDEX_CONFIG)) and not _past_limit(live)


def _past_limit(live: Path) -> bool:
    """Whether the delta of ``live`` holds or hides more rows than its fold limit (False: it has none)."""
    config = read_config(live)
    return "base_rows" in config and delta_size(live) > fold_limit(config["base_count"])


def _fold_if_past_limit(path: Path, lock_timeout: float) -> bool:
    """Fold the live delta into new base files if the change just published left it past its limit (a bulk
    change: readers would replay it on every load); whether it did. Best effort: the change is published already,
    and where the fold fails (another writer holds the lock, a full disk, a damaged base file) the next change
    writes whole files, as a delta past its limit asks."""
    try:
        if not _past_limit(current_generation(path)):  # read without the lock: most changes stop here
            return False
        with new_generation(path, change=True, lock_timeout=lock_timeout, verify_live=False) as gen:
            if not _past_limit(current_generation(path)):  # another writer folded it first, or left it small
                raise Unchanged
            live, manifest, _ = _live(path, fold=True)
            editor = StoreEditor(live, gen)  # folds the delta into its copy of the base store
            count = editor.finish()
            empty = np.empty(0, np.int64)
            _finish_change(live, gen, manifest, empty, np.empty((0, 0), np.float32), empty, count, False)
            return True
    except Exception as exc:
        log.warning("the change was published; folding its delta into new base files failed (%s)", exc)
    return False


_DAMAGE_WORDS = ("malformed", "not a database", "Could not decode")


@contextlib.contextmanager
def _named_damage(live: Path) -> Iterator[None]:
    """SQLite's word that a store it reads is damaged ("malformed", "not a database") as a BundleError naming the
    file: a change kept as a delta reads the base store's pages it looks up, without hashing the whole file."""
    try:
        yield
    except sqlalchemy.exc.DatabaseError as exc:
        orig = exc.orig
        if not isinstance(orig, sqlite3.DatabaseError) or not any(w in str(orig) for w in _DAMAGE_WORDS):
            raise  # a full disk, a lock: not damage (new_generation says what failed)
        raise BundleError(
            f"bundle file {str(live / STORE_DB)!r} is damaged: SQLite reads it as {orig}; nothing was published. "
            "Restore the bundle from a copy, or rebuild it"
        ) from None


def _editor(live: Path, gen: Path, delta: bool) -> StoreEditor | DeltaEditor:
    return DeltaEditor(live, gen) if delta else StoreEditor(live, gen)


def apply_rows(
    path: Path,
    encoder: Encoder,
    operation: str,
    reader_for: ReaderFactory,
    lock_timeout: float,
    show_progress: bool = True,
    allow_encoder_mismatch: bool = False,
) -> ChangeReport:
    """``add`` (an id already in the bundle is an error) or ``upsert`` (a changed title is re-encoded, changed
    metadata alone rewritten, an identical row left as it is) the rows ``reader_for(live manifest)`` reads.
    Rows that change nothing publish nothing (``published`` is false)."""
    started = time.perf_counter()
    tally = dict.fromkeys(("added", "updated", "metadata_updated", "unchanged", "encoded"), 0)
    published = False
    with new_generation(path, change=True, lock_timeout=lock_timeout, verify_live=False) as gen:
        live, manifest, delta = _live(path)
        if manifest.encoder["fingerprint"] != encoder.fingerprint and not allow_encoder_mismatch:
            raise BundleError(
                f"bundle {str(path)!r} was built with another encoder (fingerprint "
                f"{manifest.encoder['fingerprint'][:12]}, this one {encoder.fingerprint[:12]}): titles "
                "encoded by it would not be comparable; load the bundle with its own encoder, or pass "
                "allow_encoder_mismatch=True"
            )
        reader = reader_for(manifest)
        edits = _Edits(live, gen, delta)
        count = edits.store.count
        try:
            with (
                _named_damage(live),
                progress.bar(show_progress, desc=f"{operation}: encoding titles", unit="title") as bar,
            ):
                for chunk in reader:
                    edits.apply(chunk, encoder, operation, reader.name, tally)
                    bar.update(len(chunk))
            if reader.count == 0:
                raise BadRowError(f"{reader.name} has no usable rows ({reader.skipped} skipped); nothing changed")
        except BaseException:
            edits.abort()
            raise
        edits.store.close()
        if edits.editor is None:  # every row as stored: a generation would only churn the disk (client retries)
            raise Unchanged
        count = edits.editor.finish()
        _finish_change(live, gen, manifest, edits.dead(), edits.vectors(encoder.dim), edits.row_ids(), count, delta)
        published = True
    folded = published and delta and _fold_if_past_limit(path, lock_timeout)
    if reader.skipped:
        log.warning("skipped %d bad row(s), e.g. %s", reader.skipped, "; ".join(reader.skipped_examples))
    return ChangeReport(
        operation,
        **tally,
        count=count,
        generation=current_generation(path).name,
        seconds=time.perf_counter() - started,
        published=published,
        folded=folded,
    )


class _Edits:
    """The store edits of one add or upsert. The staging copy of the store is made at the first row that changes
    something: until then lookups read the live store, so rows that change nothing copy nothing."""

    def __init__(self, live: Path, gen: Path, delta: bool) -> None:
        self.live, self.gen, self.delta = live, gen, delta
        self.store = Store.open(live)
        self.editor: StoreEditor | DeltaEditor | None = None
        self._dead: list[int] = []
        self._ids: list[np.ndarray] = []
        self._vectors: list[np.ndarray] = []

    def apply(self, chunk: Chunk, encoder: Encoder, operation: str, source: str, tally: dict[str, int]) -> None:
        existing = (self.editor or self.store).lookup(chunk.ids)
        if self.store.id_type is IdType.INT:
            _check_int_ids(chunk.ids, chunk.rows, source)
        fresh, replaced, meta_changes = _sort_rows(chunk, existing, operation, source, tally)
        if not (fresh or replaced or meta_changes):
            return
        if self.editor is None:
            self.editor = _editor(self.live, self.gen, self.delta)
        self.editor.update_metadata(meta_changes)
        self.editor.delete(replaced)  # before their new versions take the same external ids
        self._dead += replaced
        if fresh:
            row_ids, vectors = _append_titles(self.editor, encoder, chunk, fresh)
            self._ids.append(row_ids)
            self._vectors.append(vectors)
            tally["encoded"] += len(fresh)

    def dead(self) -> np.ndarray:
        return np.asarray(self._dead, dtype=np.int64)

    def row_ids(self) -> np.ndarray:
        return np.concatenate(self._ids) if self._ids else np.empty(0, np.int64)

    def vectors(self, dim: int) -> np.ndarray:
        return np.concatenate(self._vectors) if self._vectors else np.empty((0, dim), np.float32)

    def abort(self) -> None:
        if self.editor is not None:
            self.editor.abort()
        self.store.close()


def _sort_rows(
    chunk: Chunk, existing: dict[str, StoredTitle], operation: str, source: str, tally: dict[str, int]
) -> tuple[list[int], list[int], dict[int, str]]:
    """What ``chunk`` changes, counted into ``tally``: the rows to encode (new ids, changed titles), the store rows
    their changed titles replace, and the new metadata of rows whose title stays."""
    fresh: list[int] = []
    replaced: list[int] = []
    meta_changes: dict[int, str] = {}
    for j, ext in enumerate(chunk.ids):
        old = existing.get(ext)
        meta = metadata_json(chunk.metadata[j])
        if old is None:
            fresh.append(j)
            tally["added"] += 1
        elif operation == "add":
            raise DuplicateIdError(
                f"{source} row {chunk.rows[j]}: id {ext!r} is already in the bundle; use upsert to replace it"
            )
        elif old.title != chunk.titles[j]:
            replaced.append(old.row_id)
            fresh.append(j)
            tally["updated"] += 1
        elif old.metadata != json.loads(meta):  # as values: key order does not matter
            meta_changes[old.row_id] = meta
            tally["metadata_updated"] += 1
        else:
            tally["unchanged"] += 1
    return fresh, replaced, meta_changes


def _append_titles(
    editor: StoreEditor | DeltaEditor, encoder: Encoder, chunk: Chunk, fresh: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Encode the ``fresh`` rows of ``chunk`` and append them to the store: their row ids and vectors."""
    titles = [chunk.titles[j] for j in fresh]
    vectors = encoder.encode_titles(titles)
    row_ids = editor.append(
        [chunk.ids[j] for j in fresh],
        titles,
        [metadata_json(chunk.metadata[j]) for j in fresh],
        vectors,
    )
    return row_ids, vectors


@dataclass(frozen=True)
class ReaderFactory:
    """Makes the change's :class:`CatalogueReader` once the live manifest is known (its columns are the default)."""

    source: str | Path | pd.DataFrame
    id_column: str | None
    title_column: str | Sequence[str] | None
    skip_bad_rows: bool
    encoding: str
    chunksize: int

    def __call__(self, manifest: Manifest) -> CatalogueReader:
        built_with = manifest.source
        return CatalogueReader(
            self.source,
            id_column=self.id_column or built_with.get("id_column", "id"),
            title_column=self.title_column or built_with.get("title_columns", "title"),
            skip_bad_rows=self.skip_bad_rows,
            chunksize=self.chunksize,
            encoding=self.encoding,
        )


def remove(path: Path, ids: Iterable[ExternalId], *, missing_ok: bool, lock_timeout: float) -> ChangeReport:
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
    published = False
    with new_generation(path, change=True, lock_timeout=lock_timeout, verify_live=False) as gen:
        live, manifest, delta = _live(path)
        count = read_config(live)["count"]
        editor = _editor(live, gen, delta)
        try:
            with _named_damage(live):
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
        if not len(dead):  # only ids that are not there (missing_ok): nothing to publish
            editor.abort()
            raise Unchanged
        count = editor.finish()
        _finish_change(live, gen, manifest, dead, np.empty((0, 0), np.float32), np.empty(0, np.int64), count, delta)
        published = True
    folded = published and delta and _fold_if_past_limit(path, lock_timeout)
    return ChangeReport(
        "remove",
        removed=len(dead),
        missing=len(missing),
        count=count,
        generation=current_generation(path).name,
        seconds=time.perf_counter() - started,
        published=published,
        folded=folded,
    )


def compact(
    path: Path, *, index_config: IndexConfig | None, lock_timeout: float, show_progress: bool = True
) -> ChangeReport:
    """Rewrite the bundle without the rows removed titles left behind, and rebuild the index from the stored
    vectors (no re-encoding), with ``index_config`` if given."""
    started = time.perf_counter()
    with new_generation(path, change=True, lock_timeout=lock_timeout, verify_live=False) as gen:
        live, manifest, _ = _live(path, whole=True)
        config = index_config or generation.compact_config(live, manifest)
        old = Store.open(live)
        try:
            count, blocks = generation.copy_rows(old, gen, show_progress=show_progress)
            # the live rows, renumbered as the store's copy renumbers them
            live_lexical = load_lexical(live, old.delta, len(old.vectors)) if manifest.lexical is not None else None
        finally:
            old.close()
        built = generation.index_from_store(gen, config)
        if live_lexical is not None:
            lexical = live_lexical.compacted()
        else:
            lexical = generation.lexical_from_store(gen, Analyzer.AUTO)
        record = generation.lexical_record(lexical, manifest)
        generation.finish(
            gen,
            generation.changed(manifest, count, index=generation.index_record(built, config), lexical=record),
            index=built,
            lexical=lexical,
            carry_from=(live, generation.non_catalogue(manifest)),
            rewritten=True,
            vector_blocks=blocks,
        )
    return ChangeReport(
        "compact", count=count, generation=current_generation(path).name, seconds=time.perf_counter() - started
    )


def _finish_change(
    live: Path,
    gen: Path,
    manifest: Manifest,
    dead: np.ndarray,
    vectors: np.ndarray,
    ids: np.ndarray,
    count: int,
    delta: bool,
) -> None:
    """Finish a change kept as a delta (the store's files are written; the base files are carried), or apply
    removals and additions to the live index (rebuilding it where the backend cannot remove) and BM25 postings."""
    moved = generation.moved_sum(manifest, live, dead, vectors)
    if moved is not None:  # the catalogue's mean cosine follows the live vectors
        manifest = dataclasses.replace(manifest, lexical=moved)
    if delta:
        carried = [name for name in manifest.files if name not in _DELTA_WRITES]
        generation.finish(gen, generation.changed(manifest, count), carry_from=(live, carried))
        return
    store = Store.open(live)
    try:  # the live index and postings, the delta read once and replayed onto both
        index = load_index(live, store.delta, store.vectors)
        live_lexical = load_lexical(live, store.delta, len(store.vectors))
    finally:
        store.close()
    if not index.remove(dead):
        index = generation.index_from_store(gen, index.config, tune=False)
    else:
        index.add(vectors, ids)
    lexical = generation.lexical_for_change(live_lexical, gen, dead, ids)
    generation.finish(
        gen,
        generation.changed(manifest, count, lexical=generation.lexical_record(lexical, manifest)),
        index=index,
        lexical=lexical,
        carry_from=(live, generation.non_catalogue(manifest)),
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


def copy_bundle(
    snap: Snapshot,
    source: Path | None,
    out: Path,
    *,
    limit: int | None,
    index_config: IndexConfig,
    overwrite: bool,
    lock_timeout: float,
    show_progress: bool,
) -> None:
    """A new bundle at ``out`` from ``snap``'s live titles (the first ``limit``), their stored vectors and (from the
    generation directory ``source``, or ``snap``) the reranker and query encoder."""
    if source is not None:  # every row and file of it is copied, hashed anew: check them all first
        read_manifest(source, verify=True)
    with new_generation(out, overwrite=overwrite, lock_timeout=lock_timeout) as gen:
        count, blocks = generation.copy_rows(snap.store, gen, limit=limit, show_progress=show_progress)
        built = generation.index_from_store(gen, index_config)
        analyzer = (snap.manifest.lexical or {}).get("analyzer", Analyzer.AUTO)
        lexical = generation.lexical_from_store(gen, analyzer)
        before, fusion = snap.manifest.lexical or {}, None
        if "dense_sum" in before:  # the copied rows' own sum
            fusion = {k: before[k] for k in generation.FUSION_ENTRIES if k in before} | {
                "dense_sum": generation.stored_sum(gen).tolist()
            }
        manifest = generation.changed(
            snap.manifest,
            count,
            index=generation.index_record(built, index_config),
            lexical=generation.lexical_record(lexical, snap.manifest, fusion=fusion),
            source={**snap.manifest.source, "name": f"{count} titles of {source}"},
        )
        generation.finish(
            gen,
            manifest,
            index=built,
            lexical=lexical,
            scorer=None if source else snap.scorer,
            carry_from=(source, generation.non_catalogue(snap.manifest)) if source else None,
            rewritten=True,
            vector_blocks=blocks,
        )
