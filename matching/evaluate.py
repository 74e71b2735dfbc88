"""Evaluation on BEIR-layout query sets (the metrics themselves are in :mod:`matching.metrics`)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from matching.errors import InputFileError, SchemaError
from matching.metrics import Qrels, mean_metrics
from matching.types import Retrieval

if TYPE_CHECKING:
    import pandas as pd

    from matching.matcher import Matcher


# -- BEIR layout ---------------------------------------------------------------------------------


def load_queries(path: str | Path) -> dict[str, str]:
    """``queries.jsonl`` lines of ``{"_id": ..., "text": ...}``."""
    path = Path(path)
    out: dict[str, str] = {}
    try:
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out[str(row["_id"])] = str(row["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise SchemaError(
                        f"{str(path)!r} line {line_no}: expected a JSON object with '_id' and 'text' ({exc})"
                    ) from None
    except OSError as exc:
        raise InputFileError(f"cannot read queries file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputFileError(f"queries file {str(path)!r} is not UTF-8 ({exc.reason}); re-save it as UTF-8") from None
    return out


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """BEIR ``qrels/<split>.tsv``: header ``query-id corpus-id score``, tab-separated."""
    path = Path(path)
    out: dict[str, dict[str, int]] = {}
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t")
            header = next(reader, None)
            if header is None:
                raise SchemaError(f"{str(path)!r} is empty; expected a header 'query-id corpus-id score'")
            for line_no, row in enumerate(reader, 2):
                if not row:
                    continue
                try:
                    qid, did, grade = row[0], row[1], int(float(row[2]))
                except (IndexError, ValueError):
                    raise SchemaError(
                        f"{str(path)!r} line {line_no}: expected query-id, corpus-id, score (tab-separated), got {row}"
                    ) from None
                out.setdefault(qid, {})[did] = grade
    except OSError as exc:
        raise InputFileError(f"cannot read qrels file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputFileError(f"qrels file {str(path)!r} is not UTF-8 ({exc.reason}); re-save it as UTF-8") from None
    return out


@dataclass
class EvalReport:
    """Metrics per way of searching: retrieval alone (``dense``, ``lexical``, ``hybrid``, as the bundle has them) and
    ``reranked`` (the matcher's default retrieval, then the scorer). ``retrieval`` is the default retrieval alone."""

    queries: int
    retrieval: dict[str, float] = field(default_factory=dict)
    reranked: dict[str, float] = field(default_factory=dict)
    columns: dict[str, dict[str, float]] = field(default_factory=dict)

    def table(self) -> str:
        columns = self.columns or {"retrieval": self.retrieval, "reranked": self.reranked}
        names = list(self.reranked)
        lines = [f"{'metric':<12}" + "".join(f"{c:>12}" for c in columns)]
        lines += [f"{n:<12}" + "".join(f"{col[n]:>12.4f}" for col in columns.values()) for n in names]
        lines.append(f"({self.queries} queries)")
        return "\n".join(lines)


def evaluate(
    matcher: Matcher,
    queries: Mapping[str, str],
    qrels: Qrels,
    *,
    k_values: Iterable[int] = (10, 100),
    candidates: int = 100,
    show_progress: bool = False,
) -> EvalReport:
    """Evaluate ``matcher`` on the queries that have judgements in ``qrels``: each retrieval the bundle has, side
    by side, and the default one reranked."""
    qids = [q for q in qrels if q in queries]
    if not qids:
        raise SchemaError("no query in the qrels file has a text in the queries file; check the ids match")
    ks = sorted(set(k_values))
    depth = max(max(ks), candidates)
    texts = [queries[q] for q in qids]
    vectors = matcher.query_encoder.encode_queries(texts, show_progress=show_progress)
    qrels_used = {q: qrels[q] for q in qids}
    report = EvalReport(queries=len(qids))
    ways = [Retrieval.DENSE, *([Retrieval.LEXICAL, Retrieval.HYBRID] if matcher.snapshot.lexical else [])]
    for way in [*ways, None]:
        hits = matcher.search_vectors(
            vectors, depth, texts=texts, candidates=depth, rerank=way is None, retrieval=way or matcher.retrieval
        )
        runs = {q: [str(h.id) for h in hs] for q, hs in zip(qids, hits, strict=True)}
        report.columns[way.value if way else "reranked"] = mean_metrics(runs, qrels_used, ks)
    report.retrieval = report.columns[matcher.retrieval.value]
    report.reranked = report.columns["reranked"]
    return report


# -- labelled pairs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PairColumns:
    query_column: str
    title_column: str
    label_column: str


@dataclass
class PairReport:
    """One metric (``roc_auc`` for 0/1 labels, else ``spearman``) per signal of labelled pairs: the ``cosine``, the
    ``lexical`` share (BM25 over the query's own), the untrained ``fused`` default and the bundle's ``reranker``
    (equal to ``fused`` while it is untrained)."""

    pairs: int
    metric: str
    signals: dict[str, float]
    trained: bool

    def table(self) -> str:
        lines = [f"{'signal':<10}{self.metric:>12}"]
        lines += [f"{name:<10}{value:>12.4f}" for name, value in self.signals.items()]
        state = "trained" if self.trained else "untrained: the fused default"
        lines.append(f"({self.pairs} pairs; the reranker is {state})")
        return "\n".join(lines)


def evaluate_pairs(
    matcher: Matcher,
    pairs: pd.DataFrame | str | Path,
    *,
    query_column: str = "query",
    title_column: str = "title",
    label_column: str = "label",
) -> PairReport:
    """Score labelled (query, title, label) pairs (a DataFrame or a CSV/TSV/JSONL file) with every signal, side by
    side, so a user sees what each part brings on their data."""
    import dataclasses as dc

    import numpy as np

    from matching.metrics import roc_auc, spearman
    from matching.scorer import Scorer
    from matching.training.loop import read_pairs

    frame = read_pairs(pairs, _PairColumns(query_column, title_column, label_column))
    if frame.empty:
        raise SchemaError("no labelled pairs to evaluate")
    snap = matcher.snapshot
    queries, titles = frame["query"].tolist(), frame["title"].tolist()
    labels = frame["label"].to_numpy()
    q, t = snap.encode_pairs(queries, titles)
    binary = bool(np.isin(labels, [0.0, 1.0]).all())

    def metric(scores: np.ndarray) -> float:
        return roc_auc(labels, scores) if binary else spearman(scores, labels)

    signals = {"cosine": metric(np.einsum("ij,ij->i", q, t))}
    if snap.scorer.config.lexical and snap.lexical is not None:
        lex = snap.lexical_features(queries, titles)
        signals["lexical"] = metric(lex[:, 0])
        untrained = Scorer(dc.replace(snap.scorer.config))
        untrained.centre = snap.scorer.centre
        signals["fused"] = metric(untrained.score(q, t, lex))
        signals["reranker"] = metric(snap.scorer.score(q, t, lex))
    else:
        signals["reranker"] = metric(snap.scorer.score(q, t))
    return PairReport(len(frame), "roc_auc" if binary else "spearman", signals, snap.scorer.trained)
