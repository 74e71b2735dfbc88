"""The query path over one generation: a :class:`Snapshot` of its parts, retrieval behind :class:`Retriever`,
reranking behind :class:`Reranker`, and the :class:`~matching.types.Match` list that comes back."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from matching.bundle import Lease, Manifest, read_manifest
from matching.encoder import Encoder
from matching.errors import BundleError, ConfigError
from matching.exact import exact_subset
from matching.generation import load_encoder
from matching.index import VectorIndex
from matching.layout import QUERY_ENCODER
from matching.scorer import Scorer
from matching.store import Store, Where
from matching.types import Match, Preset

# a filter that leaves at most this many titles is searched exactly over their stored vectors
EXACT_FILTER_LIMIT = 20_000


class Handle:
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
class Snapshot:
    """One generation's parts. A search reads them all from one snapshot, so it never mixes two; trainers take a
    snapshot too (never the facade)."""

    encoder: Encoder  # the title tower: what the stored vectors were encoded with
    query_encoder: Encoder
    index: VectorIndex
    store: Store
    scorer: Scorer
    manifest: Manifest
    handle: Handle = field(repr=False)
    generation: str | None = None

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
        uq = list(dict.fromkeys(queries))
        q_vecs = self.query_encoder.encode_queries(uq, show_progress=show_progress)
        q_pos = {q: i for i, q in enumerate(uq)}
        ut = list(dict.fromkeys(titles))
        rows = self.store.find_titles(ut)
        t_vecs = np.empty((len(ut), self.encoder.dim), dtype=np.float32)
        cached = [(i, r) for i, r in enumerate(rows) if r is not None]
        if cached:
            t_vecs[[i for i, _ in cached]] = self.store.vectors[[r for _, r in cached]]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            t_vecs[missing] = self.encoder.encode_titles([ut[i] for i in missing], show_progress=show_progress)
        t_pos = {t: i for i, t in enumerate(ut)}
        return q_vecs[[q_pos[q] for q in queries]], t_vecs[[t_pos[t] for t in titles]]


def open_snapshot(
    path: Path,
    lease: Lease,
    *,
    encoder: Encoder | None = None,
    model: str | Path | None = None,
    device: str | None = None,
    preset: Preset | str | None = None,
    verify: bool = True,
    allow_encoder_mismatch: bool = False,
) -> Snapshot:
    """Open the leased generation: its encoder (checked against the manifest's fingerprint), query tower, index,
    store and reranker. The lease is the caller's to release if this fails."""
    gen = lease.generation
    manifest = read_manifest(gen, verify=verify)
    if encoder is None:
        encoder = load_encoder(manifest.encoder, model=model, device=device, preset=preset)
    elif preset is not None:
        encoder.set_preset(preset)
    if encoder.fingerprint != manifest.encoder["fingerprint"] and not allow_encoder_mismatch:
        raise BundleError(
            f"the encoder ({encoder.source}) is not the one bundle {str(path)!r} was built with "
            f"(fingerprint {encoder.fingerprint[:12]} != {manifest.encoder['fingerprint'][:12]}); "
            "load the same model, or pass allow_encoder_mismatch=True if you know they are compatible"
        )
    query_encoder = encoder
    if manifest.query_encoder:
        query_encoder = encoder.clone(source=f"query tower in {path}")
        query_encoder.load_weights(gen / QUERY_ENCODER)
        if query_encoder.fingerprint != manifest.query_encoder["fingerprint"]:
            raise BundleError(f"the query tower in {str(gen)!r} does not match its manifest fingerprint")
    index = VectorIndex.load(gen)
    scorer = Scorer.load(gen).to(encoder.device)
    store = Store.open(gen)
    if index.ntotal != store.count:
        store.close()
        raise BundleError(f"index holds {index.ntotal} vectors but the store {store.count} rows")
    if store.vectors.shape[1] != encoder.dim or scorer.config.dim != encoder.dim:
        store.close()
        raise BundleError(
            f"dimension mismatch: encoder {encoder.dim}, store {store.vectors.shape[1]}, scorer {scorer.config.dim}"
        )
    return Snapshot(encoder, query_encoder, index, store, scorer, manifest, Handle(store, lease), gen.name)


# -- retrieval ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidates:
    """Per query, up to ``depth`` candidate row ids (-1 pads) with the score each was retrieved with."""

    scores: np.ndarray  # (nq, depth) float32, -inf where padded
    ids: np.ndarray  # (nq, depth) int64, -1 where padded


class Retriever(Protocol):
    """Finds candidates for a batch of queries (their vectors, and their texts where known)."""

    def retrieve(self, snap: Snapshot, vectors: np.ndarray, depth: int, allowed: np.ndarray | None) -> Candidates: ...


class DenseRetriever:
    """FAISS over the title vectors; a filter (``allowed``: ascending row ids) is searched inside FAISS, or exactly
    over the allowed titles' stored vectors when few titles pass it."""

    def retrieve(self, snap: Snapshot, vectors: np.ndarray, depth: int, allowed: np.ndarray | None) -> Candidates:
        stored = snap.store.vectors
        if allowed is None:
            return Candidates(*snap.index.search(vectors, depth, stored=stored))
        if len(allowed) <= EXACT_FILTER_LIMIT:
            return Candidates(*exact_subset(vectors, stored, allowed, depth))
        mask = np.zeros(stored.shape[0], dtype=bool)
        mask[allowed] = True
        try:
            scores, ids = snap.index.search(vectors, depth, allowed=mask, stored=stored)
        except NotImplementedError:
            return Candidates(*exact_subset(vectors, stored, allowed, depth))
        # an approximate index can come back short under a selective filter: search those queries exactly
        short = np.flatnonzero((ids >= 0).sum(axis=1) < min(ids.shape[1], len(allowed)))
        if len(short):
            scores[short], ids[short] = exact_subset(vectors[short], stored, allowed, ids.shape[1])
        return Candidates(scores, ids)


# -- reranking ---------------------------------------------------------------------------------------------------


class Reranker(Protocol):
    """Scores one query's candidates (row ids into the snapshot's store); higher is better."""

    def rerank(self, snap: Snapshot, query: np.ndarray, row_ids: np.ndarray, retrieved: np.ndarray) -> np.ndarray: ...


class ScorerReranker:
    """The bundle's MLP scorer over (query vector, stored title vector)."""

    def rerank(self, snap: Snapshot, query: np.ndarray, row_ids: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
        return snap.scorer.score(query[None, :], snap.store.vectors[row_ids])


class NoReranker:
    """Keeps the retrieval order and scores."""

    def rerank(self, snap: Snapshot, query: np.ndarray, row_ids: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
        return retrieved


def search(
    snap: Snapshot,
    vectors: np.ndarray,
    k: int,
    *,
    candidates: int,
    retriever: Retriever,
    reranker: Reranker,
    where: Where | None = None,
) -> list[list[Match]]:
    """The ``k`` best titles for each query vector: ``retriever`` finds ``max(k, candidates)``, ``reranker``
    orders them, and the rows are read from the store."""
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    allowed = snap.store.filter_ids(where) if where is not None else None
    found = retriever.retrieve(snap, vectors, max(k, candidates), allowed)
    store = snap.store
    ranked: list[list[tuple[int, float, float]]] = []
    for qi in range(len(vectors)):
        keep = found.ids[qi] >= 0
        cand_ids, cand_scores = found.ids[qi][keep], found.scores[qi][keep]
        scores = reranker.rerank(snap, vectors[qi], cand_ids, cand_scores) if len(cand_ids) else cand_scores
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
