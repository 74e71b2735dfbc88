"""The facade: build a bundle from a catalogue, load it, search it, change it, train it. It delegates: the query
path is :mod:`matching.search`, writes go through :mod:`matching.changes` and :mod:`matching.generation`, and
trainers (:mod:`matching.training`) take a :class:`~matching.search.Snapshot`."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from matching import changes
from matching.analysis import Analyzer, check_analyzer
from matching.building import build_bundle, reencode_bundle
from matching.bundle import DEFAULT_LOCK_TIMEOUT, check_target
from matching.config import EncoderConfig, IndexConfig
from matching.encoder import Encoder
from matching.errors import ConfigError
from matching.fields import FieldSpec, indexed_fields
from matching.generation import untrained_scorer
from matching.ingest import DEFAULT_CHUNKSIZE, has_surrogate
from matching.layout import QUERY_ENCODER, SCORER_CONFIG, SCORER_WEIGHTS, TRAIN_REPORT
from matching.overlap import start_encoding
from matching.scorer import Scorer
from matching.search import NoReranker, Queries, ScorerReranker, Snapshot, retriever_for, search
from matching.served import ServedBundle, open_live
from matching.store import Where
from matching.types import ChangeReport, Engine, ExternalId, Match, Preset, Retrieval
from matching.vectors import VectorIndex

if TYPE_CHECKING:
    from matching.training.distill import DistillReport
    from matching.training.loop import TrainReport

log = logging.getLogger(__name__)


class Matcher(ServedBundle):
    """Two-tower matcher over one bundle: query encoder + vector index (FAISS) + BM25 index + store + reranker.

    Build with :meth:`build` or open with :meth:`load`; ``__init__`` only wraps an opened :class:`Snapshot`.
    The generation served, and how it moves on (refresh, writes), is :class:`~matching.served.ServedBundle`'s.
    """

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
        index_fields: Sequence[str] | str | None = None,
        scorer_hidden: int = 256,
        analyzer: Analyzer | str = Analyzer.AUTO,
        retrieval: Retrieval | str | None = None,
        skip_bad_rows: bool = False,
        encoding: str = "utf-8",
        chunksize: int = DEFAULT_CHUNKSIZE,
        overwrite: bool = False,
        show_progress: bool = True,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        engine: Engine | str = Engine.LOCAL,
        ray_address: str | None = None,
        encoders: int | None = None,
    ) -> Matcher:
        """Encode every title of ``source`` into a new bundle at ``path``: a CSV/TSV/JSONL/Parquet file, a directory
        or glob of them (ids unique across all), or a DataFrame.

        ``title_column`` may name several columns; their values are joined with a space.
        Every other column is kept as metadata. ``engine="ray"`` reads and encodes on a Ray cluster
        (``ray_address``; default: a local one) with ``encoders`` encoder actors (:mod:`matching.distributed`).
        ``preset`` picks the encoder's speed/precision (:class:`~matching.types.Preset`; default ``default``).
        ``index_config`` defaults to the automatic index for the size. ``index_fields``: metadata fields given a
        column for fast ``where`` filters (:mod:`matching.fields`): ``"auto"``, ``"none"`` or a list of names.
        Nothing is published unless the whole build succeeds.
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
        fields = FieldSpec.of(index_fields)
        # fail on a bad index or scorer setting now, not after encoding the whole catalogue
        VectorIndex.empty(encoder.dim, index_config)
        analyzer = check_analyzer(Analyzer(analyzer))
        retrieval = Retrieval(retrieval) if retrieval is not None else None
        # the untrained reranker scores as the default retrieval ranks: cosine, BM25, or their fusion
        scorer_config = untrained_scorer(encoder.dim, scorer_hidden, retrieval)
        rows = build_bundle(
            source,
            path,
            encoder,
            id_column=id_column,
            title_column=title_column,
            index_config=index_config,
            fields=fields,
            scorer_config=scorer_config,
            analyzer=analyzer,
            retrieval=retrieval,
            skip_bad_rows=skip_bad_rows,
            encoding=encoding,
            chunksize=chunksize,
            overwrite=overwrite,
            show_progress=show_progress,
            lock_timeout=lock_timeout,
            engine=Engine(engine),
            ray_address=ray_address,
            encoders=encoders,
        )
        if rows.skipped:
            log.warning("skipped %d bad row(s), e.g. %s", rows.skipped, "; ".join(rows.skipped_examples))
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
        retrieval: Retrieval | str | None = None,
    ) -> Matcher:
        """Open the live generation of the bundle at ``path``.

        The encoder is loaded from where the manifest says it came from unless ``model``/``encoder``
        is given; either way its fingerprint must match the one the titles were encoded with.
        ``preset`` sets the encoder's speed/precision for queries and later additions (default: the one
        the bundle was built with); every preset of one checkpoint shares the vector space.
        The generation stays on disk while this matcher uses it, even if writers publish newer ones
        (see :meth:`refresh`). ``lock_timeout`` is how long this matcher's writes wait for another writer.
        ``retrieval`` is the default for searches (``hybrid`` where the bundle has a lexical index).
        """
        path = Path(path)
        snap = open_live(
            path,
            encoder=encoder,
            model=model,
            device=device,
            preset=preset,
            verify=verify,
            allow_encoder_mismatch=allow_encoder_mismatch,
        )
        return cls(
            snap,
            path=path,
            lock_timeout=lock_timeout,
            allow_encoder_mismatch=allow_encoder_mismatch,
            retrieval=retrieval,
        )

    def pin(self) -> Matcher:
        """A read-only view of the generation served now, which refreshes and writes here do not move (one
        generation for a whole request); do not close it: the generation goes when no view holds it."""
        return Matcher(self._snap, path=None, lock_timeout=self.lock_timeout, retrieval=self.retrieval)

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
        self,
        query: str,
        k: int = 10,
        *,
        candidates: int = 100,
        rerank: bool = True,
        where: Where | None = None,
        retrieval: Retrieval | str | None = None,
    ) -> list[Match]:
        """The ``k`` best titles for ``query``: retrieval finds ``candidates`` (hybrid: from the vectors and from
        BM25 each, fused), the scorer reranks them.

        ``where`` filters on metadata inside retrieval, e.g. ``{"brand": "acme", "price": ("<", 50)}``
        (see :func:`matching.filters.where_clauses`), so ``k`` hits come back whenever ``k`` titles match.
        ``retrieval`` is ``hybrid``, ``dense`` or ``lexical`` (default: this matcher's :attr:`retrieval`).
        """
        return self.search_batch([query], k, candidates=candidates, rerank=rerank, where=where, retrieval=retrieval)[0]

    def search_batch(
        self,
        queries: Sequence[str],
        k: int = 10,
        *,
        candidates: int = 100,
        rerank: bool = True,
        show_progress: bool = False,
        where: Where | None = None,
        retrieval: Retrieval | str | None = None,
    ) -> list[list[Match]]:
        """:meth:`search` for many queries, encoded in one pass."""
        if isinstance(queries, str):
            raise ConfigError("search_batch takes a list of queries; use search() for one string")
        bad = [i for i, q in enumerate(queries) if not isinstance(q, str)]
        if bad:
            raise ConfigError(f"queries must be strings; item {bad[0]} is {type(queries[bad[0]]).__name__}")
        bad = [i for i, q in enumerate(queries) if has_surrogate(q)]
        if bad:
            raise ConfigError(f"query {bad[0]} holds a lone surrogate (half of a UTF-16 pair); fix its decoding")
        snap = self._snap
        vectors = start_encoding(snap, queries, retrieval or self.retrieval, show_progress=show_progress)
        return self._search(snap, Queries(vectors, list(queries)), k, candidates, rerank, where, retrieval)

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 10,
        *,
        texts: Sequence[str] | None = None,
        candidates: int = 100,
        rerank: bool = True,
        where: Where | None = None,
        retrieval: Retrieval | str | None = None,
    ) -> list[list[Match]]:
        """Search with already encoded query vectors ``(n, dim)``. Without the queries' ``texts`` there are no
        words to match: retrieval is dense, and the rerank is skipped where the reranker reads words."""
        snap = self._snap
        if texts is None:
            rerank = rerank and not snap.scorer.config.lexical
            retrieval = Retrieval.DENSE
        elif len(texts) != len(np.atleast_2d(vectors)):
            raise ConfigError(f"{len(texts)} texts for {len(np.atleast_2d(vectors))} query vectors")
        return self._search(snap, Queries(vectors, texts), k, candidates, rerank, where, retrieval)

    def _search(
        self,
        snap: Snapshot,
        queries: Queries,
        k: int,
        candidates: int,
        rerank: bool,
        where: Where | None,
        retrieval: Retrieval | str | None,
    ) -> list[list[Match]]:
        retriever = retriever_for(retrieval or self.retrieval)
        reranker = ScorerReranker() if rerank else NoReranker()
        return search(snap, queries, k, candidates=candidates, retriever=retriever, reranker=reranker, where=where)

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
        reader = changes.ReaderFactory(source, id_column, title_column, skip_bad_rows, encoding, chunksize)
        return self._write(
            lambda path: changes.apply_rows(
                path, self.encoder, "add", reader, self.lock_timeout, show_progress, allow_encoder_mismatch
            )
        )

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
        reader = changes.ReaderFactory(source, id_column, title_column, skip_bad_rows, encoding, chunksize)
        return self._write(
            lambda path: changes.apply_rows(
                path, self.encoder, "upsert", reader, self.lock_timeout, show_progress, allow_encoder_mismatch
            )
        )

    def remove(self, ids: Iterable[ExternalId], *, missing_ok: bool = False) -> ChangeReport:
        """Remove titles by external id; an unknown id is an error unless ``missing_ok``."""
        return self._write(
            lambda path: changes.remove(path, ids, missing_ok=missing_ok, lock_timeout=self.lock_timeout)
        )

    def compact(self, *, index_config: IndexConfig | None = None, show_progress: bool = True) -> ChangeReport:
        """Rewrite the bundle without the rows removed titles left behind, and rebuild the index from the
        stored vectors (no re-encoding), with ``index_config`` if given."""
        return self._write(
            lambda path: changes.compact(
                path, index_config=index_config, lock_timeout=self.lock_timeout, show_progress=show_progress
            )
        )

    def copy(
        self,
        out: str | Path,
        *,
        limit: int | None = None,
        index_config: IndexConfig | None = None,
        overwrite: bool = False,
        show_progress: bool = True,
    ) -> Matcher:
        """Write a new bundle at ``out`` from this one's live titles (the first ``limit`` in row order, if given),
        reusing their stored vectors (no re-encoding), the reranker and the query encoder; returns it loaded."""
        source = self._snap.directory  # a pinned view's generation too: its weights files are carried
        changes.copy_bundle(
            self._snap,
            source,
            Path(out),
            limit=limit,
            index_config=index_config or IndexConfig(),
            overwrite=overwrite,
            lock_timeout=self.lock_timeout,
            show_progress=show_progress,
        )
        return Matcher.load(out, encoder=self.encoder, verify=False, lock_timeout=self.lock_timeout)

    # -- pair scoring ----------------------------------------------------------------------------

    def encode_pairs(
        self, queries: Sequence[str], titles: Sequence[str], *, show_progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Query and title vectors for aligned pairs (see :meth:`Snapshot.encode_pairs`): cached title vectors
        are reused, each distinct query is encoded once."""
        return self._snap.encode_pairs(queries, titles, show_progress=show_progress)

    def tokens_to_encode(
        self, queries: Sequence[str], titles: Sequence[str] = (), *, stop_above: int | None = None
    ) -> int:
        """The tokens :meth:`search_batch` of ``queries`` or :meth:`score_pairs` would encode (the bulk of their
        work; see :meth:`Snapshot.tokens_to_encode`), counted without encoding; stops once past ``stop_above``."""
        return self._snap.tokens_to_encode(queries, titles, stop_above=stop_above)

    def token_ceiling(self, queries: Sequence[str], titles: Sequence[str] = ()) -> int:
        """A ceiling on :meth:`tokens_to_encode` found without the tokenizer (each distinct text at the token
        limit)."""
        return self._snap.token_ceiling(queries, titles)

    def score_pairs(self, queries: Sequence[str], titles: Sequence[str]) -> np.ndarray:
        """The reranker's score for each (query, title) pair, as a float32 array in input order."""
        snap = self._snap
        q, t = snap.encode_pairs(queries, titles)
        return snap.pair_scores(queries, titles, q, t)

    # -- training --------------------------------------------------------------------------------

    def replace_scorer(self, scorer: Scorer, report: dict[str, Any] | None = None) -> None:
        """Publish ``scorer`` (and its training report) as a new bundle generation; search uses it next."""
        if scorer.config.dim != self.encoder.dim:
            raise ConfigError(f"scorer dimension {scorer.config.dim} != encoder dimension {self.encoder.dim}")

        def write(gen: Path) -> None:
            if report is not None:
                (gen / TRAIN_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

        manifest = self.manifest
        if reencoded := manifest.source.get("reencoded"):  # its note says the reranker was reset: no longer so
            chosen = (report or {}).get("chosen")
            note = "retrained after the re-encode" + (f": {chosen}" if chosen else "")
            manifest = dataclasses.replace(
                manifest, source={**manifest.source, "reencoded": {**reencoded, "scorer": note}}
            )
        self._publish((SCORER_WEIGHTS, SCORER_CONFIG, TRAIN_REPORT), write, manifest, scorer=scorer)

    def replace_query_encoder(self, tower: Encoder, report: dict[str, Any] | None = None) -> None:
        """Publish a fine-tuned query tower (same architecture as the title encoder) into the bundle.

        Titles stay as they were encoded; only queries are encoded by ``tower`` from then on.
        """
        if tower.dim != self.encoder.dim:
            raise ConfigError(f"query tower dimension {tower.dim} != title encoder dimension {self.encoder.dim}")
        record = {"fingerprint": tower.fingerprint, "base": self.encoder.fingerprint, "report": report}

        def write(gen: Path) -> None:
            tower.save_weights(gen / QUERY_ENCODER)

        self._publish((QUERY_ENCODER,), write, dataclasses.replace(self.manifest, query_encoder=record))

    def train_scorer(
        self,
        train_pairs: pd.DataFrame | str | Path,
        valid_pairs: pd.DataFrame | str | Path | None = None,
        *,
        save: bool = True,
        show_progress: bool = True,
        **settings: Any,
    ) -> TrainReport:
        """Train the reranker on (query, title, label) pairs; settings: :class:`matching.training.scorer.TrainConfig`.

        The untrained default, a linear and an MLP reranker are compared on the validation pairs; a learned one
        that wins (``report.chosen``) is kept and, with ``save``, published into the bundle. When none beats the
        default, nothing is published and the report says so.
        """
        from matching.training.scorer import train_scorer

        scorer, report = train_scorer(self._snap, train_pairs, valid_pairs, show_progress=show_progress, **settings)
        if report.chosen == "default":
            log.info("reranker: nothing learned beat the untrained default on the validation pairs; kept it")
        elif save:
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
        """Fine-tune a separate query tower on positive pairs; settings: :class:`matching.training.tower.TowerConfig`.

        The title vectors stay frozen. Retrain the scorer afterwards (:meth:`train_scorer`): it was fitted to
        the old query vectors.
        """
        from matching.training.tower import train_query_tower

        tower, report = train_query_tower(self._snap, train_pairs, valid_pairs, show_progress=show_progress, **settings)
        if save:
            self.replace_query_encoder(tower, report.to_dict())
        else:
            self.query_encoder = tower
        return report

    def finetune(
        self,
        train_pairs: pd.DataFrame | str | Path,
        valid_pairs: pd.DataFrame | str | Path | None = None,
        *,
        search: int = 0,
        retrain_scorer: bool = True,
        residual_share: float | None = None,
        index_config: IndexConfig | None = None,
        show_progress: bool = True,
        **settings: Any,
    ) -> TrainReport:
        """Fine-tune the encoder (both towers) on labelled pairs, encode every stored title again and, with
        ``retrain_scorer``, train the reranker (reset by the new vectors) on the same pairs over them; all published
        as one new generation (readers move on at :meth:`refresh`) whose manifest says what was done
        (``source.reencoded``), or nothing when no validation beat the starting encoder. Settings: ``FinetuneConfig``;
        ``search`` > 0: random-search trials; ``residual_share``: the reranker's (``TrainConfig``)."""
        from matching.training.finetune import finetune_encoder, search_finetune
        from matching.training.scorer import TrainConfig, train_scorer

        columns = {k: v for k, v in settings.items() if k.endswith("_column") or k == "seed"}
        columns |= {} if residual_share is None else {"residual_share": residual_share}
        reranker = TrainConfig.from_dict(columns)  # a bad reranker setting fails now, not after the fine-tune
        args = (self._snap, self.encoder, train_pairs, valid_pairs)
        if search > 0:
            tuned, report, found = search_finetune(*args, trials=search, show_progress=show_progress, **settings)
        else:
            (tuned, report), found = finetune_encoder(*args, show_progress=show_progress, **settings), None
        if report.best_epoch > 0:
            fitted: list[TrainReport] = []  # the retrained reranker's report (the live manifest may be another's)

            def retrain(snap: Snapshot) -> tuple[Scorer, TrainReport]:
                out = train_scorer(snap, train_pairs, valid_pairs, config=reranker, show_progress=show_progress)
                fitted.append(out[1])
                return out

            reencode_bundle(
                self._snap,
                self._require_path(),
                tuned,
                index_config=index_config,
                show_progress=show_progress,
                lock_timeout=self.lock_timeout,
                finetuned={**report.to_dict(), **({"search": found.to_dict()} if found else {})},
                retrain=retrain if retrain_scorer else None,
            )
            self.encoder = tuned
            self._reopen()
            if fitted:
                report.scorer_report = fitted[-1].to_dict()
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
        titles and save it as a checkpoint in ``out_dir``; settings: :func:`matching.training.distill.distill`.

        The student encodes into its own vector space: build a bundle with it (``model=out_dir``, e.g. from
        :meth:`catalogue`) rather than mixing it with vectors of the original encoder.
        """
        from matching.training.distill import distill

        titles = [r.title for rows in self.store.rows() for r in rows]
        if len(titles) > max_titles:
            pick = np.random.default_rng(settings.get("seed", 0)).choice(len(titles), max_titles, replace=False)
            titles = [titles[i] for i in np.sort(pick)]
        return distill(self.encoder, titles, out_dir, layers=layers, show_progress=show_progress, **settings)

    def reencode(
        self,
        model: str | Path | None = None,
        *,
        encoder: Encoder | None = None,
        preset: Preset | str | None = None,
        index_config: IndexConfig | None = None,
        show_progress: bool = True,
    ) -> None:
        """Switch the bundle to another encoder (``model`` directory or ``encoder``; neither: its own, e.g. in another
        ``preset``): every stored title is encoded anew, no CSV needed, and published with its index and BM25 as one
        new generation, which this matcher then serves. Readers keep the old generation until they refresh; a crash
        leaves one or the other. The reranker is reset, a query tower dropped (``source.reencoded`` says so)."""
        chosen = Preset(preset) if preset is not None else self.encoder.preset
        if encoder is None:
            config = EncoderConfig(model=str(model), preset=chosen)
            encoder = self.encoder.variant(preset=chosen) if model is None else Encoder.from_pretrained(config)
        reencode_bundle(
            self._snap,
            self._require_path(),
            encoder,
            index_config=index_config,
            show_progress=show_progress,
            lock_timeout=self.lock_timeout,
        )
        self.encoder = encoder
        self._reopen()

    def catalogue(self) -> pd.DataFrame:
        """Every live title as a DataFrame: ``id``, ``title`` and one column per metadata field."""
        return self.store.frame()

    # -- description -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The manifest, plus the bundle path and the indexed metadata fields (name -> kind), as a JSON-able dict."""
        indexed = indexed_fields(self._snap.store.directory)
        return {"path": str(self.path) if self.path else None, **self.manifest.to_dict(), "indexed_fields": indexed}
