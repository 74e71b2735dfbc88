"""The facade: build a bundle from a catalogue, load it, search it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

log = logging.getLogger(__name__)


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
                f"dimension mismatch: encoder {encoder.dim}, store {store.vectors.shape[1]}, "
                f"scorer {scorer.config.dim}"
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
                cfg = EncoderConfig.from_dict({**cfg.to_dict(), "model": str(model)})
            encoder = Encoder.from_pretrained(cfg)
        reader = CatalogueReader(
            source,
            id_column=id_column,
            title_column=title_column,
            skip_bad_rows=skip_bad_rows,
            chunksize=chunksize,
            encoding=encoding,
        )
        total = len(source) if isinstance(source, pd.DataFrame) else None
        index_config = index_config or IndexConfig()
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
                raise BadRowError(
                    f"{reader.name} has no usable rows ({reader.skipped} skipped); nothing was built"
                )
            writer.finish(reader.id_type)
            store = Store.open(gen)
            try:
                ids = np.arange(store.count, dtype=np.int64)
                VectorIndex.build(store.vectors, ids, index_config).save(gen)
            finally:
                store.close()
            Scorer(ScorerConfig(dim=encoder.dim, hidden=scorer_hidden)).save(gen)
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
        store = Store.open(gen)
        index = VectorIndex.load(gen)
        scorer = Scorer.load(gen).to(encoder.device)
        return cls(encoder, index, store, scorer, manifest, path=path)

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

    # -- description -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The manifest, plus the bundle path, as a JSON-able dict."""
        return {"path": str(self.path) if self.path else None, **self.manifest.to_dict()}
