"""The one writer of generations: every write (build, compact, add/upsert/remove, a new reranker or query
encoder, a copy) saves its parts into a staging generation from :func:`matching.bundle.new_generation` and
finishes it here, so the manifest records, checksums and carried files are made one way.

File names: :mod:`matching.layout`. Directory mechanics (locks, the ``CURRENT`` swap, leases): :mod:`matching.bundle`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from matching import __version__, checksums
from matching.analysis import Analyzer
from matching.bundle import Manifest, link_or_copy, new_generation, read_manifest, write_manifest
from matching.checksums import full_blocks, verify_files
from matching.config import EncoderConfig, IndexConfig, ScorerConfig
from matching.encoder import Encoder
from matching.errors import BundleError
from matching.features import DEFAULT_DENSE_WEIGHT, DENSE_CEILING, DENSE_FLOOR, DENSE_SPAN, KNOWN_POWER
from matching.layout import CATALOGUE_FILES, INDEX_CONFIG, VECTORS_FILE
from matching.lexical import LexicalIndex, lexical_files
from matching.scorer import Scorer
from matching.store import Store, read_config
from matching.types import Fusion, Preset, Retrieval
from matching.vectors import AUTO, VectorIndex, index_files


def encoder_record(encoder: Encoder) -> dict[str, Any]:
    """The manifest's encoder entry: what the titles were encoded with (queries may use another preset)."""
    config = encoder.config()
    record: dict[str, Any] = {
        "source": config.model,
        "fingerprint": encoder.fingerprint,
        "pooling": encoder.pooling.value,
        "max_length": config.max_length,
        "preset": config.preset.value,
    }
    if encoder.prompts:  # read again from the checkpoint on load; the fingerprint covers them
        record["prompts"] = encoder.prompts.to_dict()
    return record


def load_encoder(
    record: dict[str, Any],
    *,
    model: str | Path | None = None,
    device: str | None = None,
    preset: Preset | str | None = None,
) -> Encoder:
    """The encoder a manifest's entry names (or ``model`` instead), with its pooling and length settings."""
    return Encoder.from_pretrained(
        EncoderConfig(
            model=str(model) if model is not None else record["source"],
            pooling=record["pooling"],
            max_length=record["max_length"],
            device=device,
            preset=Preset(preset or record.get("preset") or EncoderConfig().preset),
        )
    )


def index_record(index: VectorIndex, requested: IndexConfig | None = None) -> dict[str, Any]:
    """The manifest's index entry: the resolved config, what build-time tuning measured, and the factory
    asked for (``auto`` is re-resolved for the new size when the bundle is compacted)."""
    record = index.record()
    if requested is not None:
        record["requested_factory"] = requested.factory
    return record


def compact_config(live: Path, manifest: Manifest) -> IndexConfig:
    """The index a compaction rebuilds: ``auto`` again if the bundle asked for it, else the same factory;
    the search parameter is tuned again unless it was fixed by the user (no target recall)."""
    current = IndexConfig.load(live / INDEX_CONFIG)
    if manifest.index.get("requested_factory") == AUTO:
        return dataclasses.replace(current, factory=AUTO, nprobe=None, ef_search=None, refine_factor=None)
    if current.target_recall and manifest.index.get("tuning"):
        return dataclasses.replace(current, nprobe=None, ef_search=None)
    return current


def index_from_store(gen: Path, config: IndexConfig, *, tune: bool = True) -> VectorIndex:
    """Build the vector index (of the backend ``config`` names) over the live rows of the store written in ``gen``
    (no re-encoding); tuned only when every stored row is live (row ids = positions)."""
    store = Store.open(gen)
    try:
        if store.count == len(store.vectors):
            return VectorIndex.build(store.vectors, np.arange(store.count, dtype=np.int64), config, tune=tune)
        live_ids = store.live_ids()
        return VectorIndex.build(store.vectors[live_ids], live_ids, config, tune=False)
    finally:
        store.close()


def non_catalogue(manifest: Manifest) -> list[str]:
    """The files of a generation that a catalogue change carries across unchanged (reranker, query encoder...)."""
    return [n for n in manifest.files if n not in CATALOGUE_FILES | index_files() | lexical_files()]


def lexical_from_store(gen: Path, analyzer: Analyzer | str) -> LexicalIndex:
    """Build the BM25 index over the live rows of the store written in ``gen`` (``auto``: analyser from the
    titles' script)."""
    store = Store.open(gen)
    try:
        titles = [pair for part in store.titles() for pair in part]
        return LexicalIndex.build(titles, Analyzer(analyzer), rows=len(store.vectors))
    finally:
        store.close()


def lexical_for_change(lexical: LexicalIndex | None, gen: Path, dead: np.ndarray, new: np.ndarray) -> LexicalIndex:
    """The live BM25 index (``lexical``, its delta replayed) with ``dead`` rows removed and the ``new`` rows of
    ``gen``'s store added; built from ``gen``'s store where the live generation has none (a bundle from before
    hybrid retrieval)."""
    if lexical is None:
        return lexical_from_store(gen, Analyzer.AUTO)
    lexical.remove(dead)
    if len(new):
        store = Store.open(gen)
        try:
            rows = store.get(new.tolist())
        finally:
            store.close()
        lexical.add(new, [r.title for r in rows])
    return lexical


def lexical_record(
    lexical: LexicalIndex,
    manifest: Manifest | None = None,
    retrieval: str = "hybrid",
    fusion: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest's lexical entry: analyser and BM25 parameters, the fusion (rule, dense weight, the centre of the
    catalogue's cosines) and the default retrieval. ``fusion`` sets the fusion entries of a new set of vectors;
    otherwise they are kept from ``manifest`` (a bundle from before the adaptive rule keeps its fixed weight)."""
    before = (manifest.lexical if manifest is not None else None) or {}
    kept = fixed_fusion() | {k: before[k] for k in (*FUSION_ENTRIES, "dense_sum") if k in before}
    return {
        **lexical.record(),
        **(fusion if fusion is not None else kept),
        "retrieval": before.get("retrieval", retrieval),
    }


# the fusion's entries of the manifest's lexical record, besides the catalogue's vector sum (``dense_sum``)
FUSION_ENTRIES = ("dense_weight", "dense_floor", "dense_span", "known_power", "fusion")


def fixed_fusion() -> dict[str, Any]:
    """The fusion entries of a bundle from before the adaptive rule: one dense weight, raw cosines."""
    return {"dense_weight": DEFAULT_DENSE_WEIGHT, "fusion": Fusion.FIXED.value}


class _Rule(TypedDict):
    dense_weight: float
    dense_floor: float
    dense_span: float
    known_power: float


# the adaptive rule's numbers, as the manifest records them and as a new bundle's reranker takes them
_ADAPTIVE_RULE: _Rule = {
    "dense_weight": DENSE_CEILING,
    "dense_floor": DENSE_FLOOR,
    "dense_span": DENSE_SPAN,
    "known_power": KNOWN_POWER,
}


def adaptive_fusion(vector_sum: np.ndarray) -> dict[str, Any]:
    """The fusion entries of new vectors: the adaptive rule, and the sum of the live vectors, from which a snapshot
    takes the centre of the catalogue's cosines (:func:`dense_centre`)."""
    return {**_ADAPTIVE_RULE, "fusion": Fusion.ADAPTIVE.value, "dense_sum": vector_sum.tolist()}


def untrained_scorer(dim: int, hidden: int, retrieval: Retrieval | None) -> ScorerConfig:
    """A new bundle's reranker: the adaptive fusion for hybrid retrieval; the cosine, or BM25, alone where that is
    the default retrieval."""
    fixed = {Retrieval.DENSE: 1.0, Retrieval.LEXICAL: 0.0}.get(retrieval or Retrieval.HYBRID)
    if fixed is None:
        return ScorerConfig(dim=dim, hidden=hidden, lexical=True, fusion=Fusion.ADAPTIVE, **_ADAPTIVE_RULE)
    return ScorerConfig(dim=dim, hidden=hidden, lexical=True, dense_weight=fixed)


def dense_centre(lexical: dict[str, Any] | None, count: int) -> float:
    """The mean cosine of two live titles drawn at random, the squared norm of their mean vector (0.0 for a bundle
    without the adaptive rule's ``dense_sum``)."""
    total = (lexical or {}).get("dense_sum")
    if not total or count < 1:
        return 0.0
    mean = np.asarray(total, dtype=np.float64) / count
    return float(mean @ mean)


def stored_sum(gen: Path) -> np.ndarray:
    """The sum of the vectors stored in generation ``gen`` (float64)."""
    store = Store.open(gen)
    try:
        total: np.ndarray = np.asarray(store.vectors, dtype=np.float64).sum(axis=0)
    finally:
        store.close()
    return total


def moved_sum(manifest: Manifest, live: Path, dead: np.ndarray, vectors: np.ndarray) -> dict[str, Any] | None:
    """The lexical entry's ``dense_sum`` after a change removes rows ``dead`` (read from the live store) and adds
    ``vectors``; None where the bundle keeps none."""
    lexical = manifest.lexical or {}
    if "dense_sum" not in lexical:
        return None
    total = np.asarray(lexical["dense_sum"], dtype=np.float64)
    if len(vectors):
        total = total + np.asarray(vectors, dtype=np.float64).sum(axis=0)
    if len(dead):
        store = Store.open(live)
        try:
            total = total - np.asarray(store.vectors[np.sort(dead)], dtype=np.float64).sum(axis=0)
        finally:
            store.close()
    return {**lexical, "dense_sum": total.tolist()}


def changed(manifest: Manifest, count: int, **fields: Any) -> Manifest:
    """``manifest`` for a new generation derived from it: new count and time stamp, ``fields`` replaced."""
    return dataclasses.replace(
        manifest,
        count=count,
        library_version=__version__,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        files={},
        **fields,
    )


def carry(live: Path, gen: Path, names: Iterable[str]) -> None:
    """Bring ``names`` of the live generation across unchanged (hard links), except those ``gen`` already has."""
    for name in names:
        if not (gen / name).exists():
            link_or_copy(live / name, gen / name)


def finish(
    gen: Path,
    manifest: Manifest,
    *,
    index: VectorIndex | None = None,
    lexical: LexicalIndex | None = None,
    scorer: Scorer | None = None,
    carry_from: tuple[Path, Iterable[str]] | None = None,
    rewritten: bool = False,
    vector_blocks: list[str] | None = None,
) -> None:
    """Save the given parts into the staging generation ``gen`` (whose store is already written, if it changed),
    carry the named files of the live generation across (``carry_from=(live, names)``; those just written are
    skipped), and write the manifest last. The shared, append-only vector file is checksummed over this
    generation's rows only; unless ``rewritten`` (compaction, a copy: the rows were written anew), its whole blocks
    must be the live file's. ``vector_blocks``: the digests of the new vector file's whole blocks, hashed as it was
    written (``StoreWriter.vector_blocks``; a new file only)."""
    if index is not None:
        index.save(gen)
    if lexical is not None:
        lexical.save(gen)
    if scorer is not None:
        scorer.save(gen)
    known: dict[str, tuple[str, int]] = {}
    blocks: dict[str, list[str]] = {}
    base: Manifest | None = None
    if carry_from is not None:
        carry(carry_from[0], gen, carry_from[1])
        with contextlib.suppress(BundleError):  # unreadable: nothing is reused, and checking carried files says why
            base = read_manifest(carry_from[0], verify=False)
        if base is not None:
            known, blocks = _linked_digests(base, carry_from[0], gen)
        # a carried file whose digest is not reused (a copy, another size, a link) is hashed anew: check it first
        carried = [name for name in carry_from[1] if name not in known]
        if carried:
            verify_files(carry_from[0], base or read_manifest(carry_from[0], verify=False), carried)
    config = read_config(gen)
    # the vector file's blocks: a change keeps its base's (their digests are reused); a file written anew takes
    # today's size
    block = base.block_bytes if base is not None and not rewritten else checksums.BLOCK_BYTES
    if vector_blocks is not None:
        if carry_from is not None and not rewritten:
            raise ValueError("vector_blocks are the digests of a vector file written anew")
        blocks[VECTORS_FILE] = vector_blocks
    written = dataclasses.replace(manifest, files={}, block_bytes=block)
    write_manifest(
        gen,
        written,
        prefixes={VECTORS_FILE: config["rows"] * config["dim"] * 4},
        known=known,
        known_blocks=blocks,
    )
    if carry_from is not None and base is not None and not rewritten:
        _check_copied_blocks(base, carry_from[0], written, blocks)


def _check_copied_blocks(base: Manifest, live: Path, written: Manifest, reused: dict[str, list[str]]) -> None:
    """An append-only file this generation holds as a copy of the live one's (manifest ``base``: a hard-linked copy
    of the bundle, or no hard links on this file system) was hashed anew: its blocks that were whole in the live
    generation must equal the live manifest's, or damage there would be blessed."""
    for name, expected in base.blocks.items():
        whole = full_blocks(base.sizes.get(name, 0), base.block_bytes)
        if name in reused or name not in written.blocks or not whole:
            continue
        if written.blocks[name][:whole] != expected[:whole]:
            raise BundleError(
                f"bundle file {str(live / name)!r} is damaged: its checksum does not match the manifest "
                "(found copying it into a new generation; nothing was published)"
            )


def _linked_digests(base: Manifest, live: Path, gen: Path) -> tuple[dict[str, tuple[str, int]], dict[str, list[str]]]:
    """The live manifest's (``base``) (digest, size) of each whole file ``gen`` shares with ``live`` by a hard link,
    and the digests of the full blocks of each append-only file it shares: the same bytes, so not hashed again (a
    fine-tuned encoder's weights are ~90 MB to ~440 MB, the vectors of 1M titles 1.5 GB, carried by every change)."""
    whole: dict[str, tuple[str, int]] = {}
    blocks: dict[str, list[str]] = {}
    for name, digest in base.files.items():
        if name not in base.sizes:
            continue
        try:
            a, b = (live / name).stat(), (gen / name).stat()
        except OSError:
            continue
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            continue
        if name in base.growable:  # appended to since: only the blocks that were full stay as they were
            blocks[name] = base.blocks.get(name, [])[: full_blocks(base.sizes[name], base.block_bytes)]
        elif b.st_size == base.sizes[name]:
            whole[name] = (digest, base.sizes[name])
    return whole, blocks


def copy_rows(
    source: Store, gen: Path, *, limit: int | None = None, show_progress: bool = False
) -> tuple[int, list[str]]:
    """Write a new store in ``gen`` from ``source``'s live rows in row order (the first ``limit`` of them, if given),
    vectors included: no re-encoding. Returns the number of rows written and the digests of the new vector file's
    whole blocks, hashed as they were written (for :func:`finish`: the file is not read again to checksum it)."""
    from matching import progress

    spec = source.fields.spec if source.fields is not None else None
    writer = Store.create(gen, source.dim, spec, hash_blocks=True)
    total = source.count if limit is None else min(limit, source.count)
    try:
        with progress.bar(show_progress, total=total, desc="copying", unit="title") as bar:
            for rows in source.rows(batch=min(50_000, max(1, total))):
                rows = rows[: total - writer.count]
                if not rows:
                    break
                writer.copy_rows(source, rows)
                bar.update(len(rows))
        writer.finish(source.id_type)  # (creates the store's indexes: a repeated id would fail here)
    except BaseException:
        writer.abort()
        raise
    return writer.count, writer.vector_blocks


def publish(
    path: Path,
    base: Path,
    replaced: tuple[str, ...],
    write: Callable[[Path], None],
    manifest: Manifest,
    *,
    scorer: Scorer | None,
    lock_timeout: float,
) -> None:
    """Publish a generation derived from ``base`` that rewrites the files ``replaced`` (``write`` and ``scorer``
    write them) and carries every other file of ``base``."""
    keep = [n for n in read_manifest(base, verify=False).files if n not in replaced]
    with new_generation(path, base=base, lock_timeout=lock_timeout) as gen:
        write(gen)
        finish(gen, manifest, scorer=scorer, carry_from=(base, keep))
