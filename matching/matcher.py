"""The facade: build a bundle from a catalogue, load it, search it."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from matching import __version__
from matching.bundle import (
    Manifest,
    check_target,
    current_generation,
    new_generation,
    read_manifest,
    write_manifest,
)
from matching.config import EncoderConfig, IndexConfig, ScorerConfig
from matching.encoder import Encoder
from matching.errors import BadRowError, BundleError, ConfigError
from matching.index import VectorIndex
from matching.ingest import DEFAULT_CHUNKSIZE, CatalogueReader, metadata_json
from matching.scorer import Scorer
from matching.store import Store
from matching.types import Match

if TYPE_CHECKING:
    from matching.train import TrainReport

log = logging.getLogger(__name__)
TRAIN_REPORT_FILE = "train_report.json"
QUERY_TOWER_FILE = "query_encoder.safetensors"


def _encoder_record(encoder: Encoder) -> dict[str, Any]:
    return {
        "source": encoder.source,
        "fingerprint": encoder.fingerprint,
        "pooling": encoder.pooling.value,
        "max_length": encoder.max_length,
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
    ) -> None:
        if index.ntotal != store.count:
            raise BundleError(f"index holds {index.ntotal} vectors but the store {store.count} rows")
        if store.vectors.shape[1] != encoder.dim or scorer.config.dim != encoder.dim:
            raise BundleError(
                f"dimension mismatch: encoder {encoder.dim}, store {store.vectors.shape[1]}, scorer {scorer.config.dim}"
            )
        self.encoder = encoder
        self.query_encoder = query_encoder or encoder
        self.index = index
        self.store = store
        self.scorer = scorer
        self.manifest = manifest
        self.path = path

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
        index_config: IndexConfig | None = None,
        scorer_hidden: int = 256,
        skip_bad_rows: bool = False,
        encoding: str = "utf-8",
        chunksize: int = DEFAULT_CHUNKSIZE,
        overwrite: bool = False,
        show_progress: bool = True,
    ) -> Matcher:
        """Encode every title of ``source`` (CSV/TSV/JSONL path or DataFrame) into a new bundle at ``path``.

        ``title_column`` may name several columns; their values are joined with a space.
        Every other column is kept as metadata. Nothing is published unless the whole build succeeds.
        """
        path = Path(path)
        check_target(path, overwrite=overwrite)
        if encoder is None:
            cfg = encoder_config or EncoderConfig()
            if model is not None:
                cfg = dataclasses.replace(cfg, model=str(model))
            encoder = Encoder.from_pretrained(cfg)
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
        with new_generation(path, overwrite=overwrite) as gen:
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
                raise BadRowError(f"{reader.name} has no usable rows ({reader.skipped} skipped); nothing was built")
            writer.finish(reader.id_type)
            store = Store.open(gen)
            try:
                ids = np.arange(store.count, dtype=np.int64)
                VectorIndex.build(store.vectors, ids, index_config).save(gen)
            finally:
                store.close()
            Scorer(scorer_config).save(gen)
            manifest = Manifest(
                library_version=__version__,
                encoder=_encoder_record(encoder),
                dim=encoder.dim,
                count=reader.count,
                index=index_config.to_dict(),
                id_type=reader.id_type.value,
                source={
                    "name": "DataFrame" if isinstance(source, pd.DataFrame) else str(source),
                    "id_column": id_column,
                    "title_columns": reader.title_columns,
                    "skipped_rows": reader.skipped,
                },
            )
            write_manifest(gen, manifest)
        if reader.skipped:
            log.warning("skipped %d bad row(s), e.g. %s", reader.skipped, "; ".join(reader.skipped_examples))
        return cls.load(path, encoder=encoder, verify=False)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        model: str | Path | None = None,
        encoder: Encoder | None = None,
        device: str | None = None,
        verify: bool = True,
        allow_encoder_mismatch: bool = False,
    ) -> Matcher:
        """Open the live generation of the bundle at ``path``.

        The encoder is loaded from where the manifest says it came from unless ``model``/``encoder``
        is given; either way its fingerprint must match the one the titles were encoded with.
        """
        path = Path(path)
        gen = current_generation(path)
        manifest = read_manifest(gen, verify=verify)
        if encoder is None:
            record = manifest.encoder
            encoder = Encoder.from_pretrained(
                EncoderConfig(
                    model=str(model) if model is not None else record["source"],
                    pooling=record["pooling"],
                    max_length=record["max_length"],
                    device=device,
                )
            )
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
            return cls(encoder, index, store, scorer, manifest, path=path, query_encoder=query_encoder)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        """Release the store's database connections."""
        self.store.close()

    def __enter__(self) -> Matcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.store.count

    def __repr__(self) -> str:
        return f"Matcher(path={str(self.path)!r}, count={len(self)}, index={self.manifest.factory!r})"

    # -- search ----------------------------------------------------------------------------------

    def search(self, query: str, k: int = 10, *, candidates: int = 100, rerank: bool = True) -> list[Match]:
        """The ``k`` best titles for ``query``: FAISS retrieves ``candidates``, the scorer reranks them."""
        return self.search_batch([query], k, candidates=candidates, rerank=rerank)[0]

    def search_batch(
        self,
        queries: Sequence[str],
        k: int = 10,
        *,
        candidates: int = 100,
        rerank: bool = True,
        show_progress: bool = False,
    ) -> list[list[Match]]:
        """:meth:`search` for many queries, encoded in one pass."""
        if isinstance(queries, str):
            raise ConfigError("search_batch takes a list of queries; use search() for one string")
        bad = [i for i, q in enumerate(queries) if not isinstance(q, str)]
        if bad:
            raise ConfigError(f"queries must be strings; item {bad[0]} is {type(queries[bad[0]]).__name__}")
        vectors = self.query_encoder.encode_queries(list(queries), show_progress=show_progress)
        return self.search_vectors(vectors, k, candidates=candidates, rerank=rerank)

    def search_vectors(
        self, vectors: np.ndarray, k: int = 10, *, candidates: int = 100, rerank: bool = True
    ) -> list[list[Match]]:
        """Search with already encoded query vectors ``(n, dim)``."""
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        retrieval, ids = self.index.search(vectors, max(k, candidates))
        ranked: list[list[tuple[int, float, float]]] = []
        for qi in range(len(vectors)):
            keep = ids[qi] >= 0
            cand_ids, cand_scores = ids[qi][keep], retrieval[qi][keep]
            if rerank and len(cand_ids):
                scores = self.scorer.score(vectors[qi : qi + 1], self.store.vectors[cand_ids])
            else:
                scores = cand_scores
            order = np.argsort(-scores, kind="stable")[:k]
            ranked.append([(int(cand_ids[j]), float(scores[j]), float(cand_scores[j])) for j in order])
        rows = {r.row_id: r for r in self.store.get([rid for hits in ranked for rid, _, _ in hits])}
        return [
            [
                Match(
                    id=self.store.external_id(rows[rid].external_id),
                    title=rows[rid].title,
                    score=score,
                    retrieval_score=retr,
                    metadata=rows[rid].metadata,
                )
                for rid, score, retr in hits
            ]
            for hits in ranked
        ]

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
        """Write a new generation that carries every file but those starting with ``replaced``."""
        if self.path is None:
            raise BundleError("this matcher has no bundle path to save into")
        keep = [n for n in self.manifest.files if not n.startswith(replaced)]
        with new_generation(self.path, carry=keep) as gen:
            write(gen)
            write_manifest(gen, dataclasses.replace(manifest, files={}))
        self._reopen()

    def _reopen(self) -> None:
        """Point every component at the live generation after this process published a new one."""
        fresh = Matcher.load(self.path or Path(), encoder=self.encoder, verify=False)
        self.store.close()
        self.index, self.store, self.scorer = fresh.index, fresh.store, fresh.scorer
        self.manifest, self.query_encoder = fresh.manifest, fresh.query_encoder

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

    # -- description -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The manifest, plus the bundle path, as a JSON-able dict."""
        return {"path": str(self.path) if self.path else None, **self.manifest.to_dict()}
