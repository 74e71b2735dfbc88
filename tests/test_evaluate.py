"""Retrieval metrics against hand computations, BEIR-layout loaders, and evaluate() on a built bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import make_catalogue

from matching.errors import InputFileError, SchemaError
from matching.evaluate import EvalReport, evaluate, load_qrels, load_queries
from matching.metrics import mean_metrics, mrr_at_k, ndcg_at_k, recall_at_k

RANKED = ["d1", "d2", "d3", "d4", "d5"]


# -- metrics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relevant", "k", "expected"),
    [
        pytest.param({"d2": 1, "d9": 1}, 3, 0.5, id="one-of-two-found"),
        pytest.param({"d2": 1, "d4": 2}, 5, 1.0, id="all-found"),
        pytest.param({"d4": 1}, 3, 0.0, id="relevant-outside-k"),
        pytest.param({"d1": 1, "d2": 1, "d3": 1, "d7": 1}, 2, 0.5, id="k-smaller-than-relevant"),
        pytest.param({}, 5, 0.0, id="no-relevant"),
        pytest.param({"d1": 0, "d2": 0}, 5, 0.0, id="only-grade-zero"),
        pytest.param({"d1": 0, "d3": 1}, 5, 1.0, id="grade-zero-is-not-relevant"),
    ],
)
def test_recall_at_k(relevant: dict[str, int], k: int, expected: float) -> None:
    assert recall_at_k(RANKED, relevant, k) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("relevant", "k", "expected"),
    [
        pytest.param({"d1": 1}, 10, 1.0, id="first"),
        pytest.param({"d3": 1, "d5": 2}, 10, 1 / 3, id="first-relevant-third"),
        pytest.param({"d5": 1}, 4, 0.0, id="relevant-outside-k"),
        pytest.param({"d5": 1}, 5, 1 / 5, id="relevant-at-k"),
        pytest.param({}, 10, 0.0, id="no-relevant"),
        pytest.param({"d1": 0, "d2": 1}, 10, 0.5, id="grade-zero-skipped"),
    ],
)
def test_mrr_at_k(relevant: dict[str, int], k: int, expected: float) -> None:
    assert mrr_at_k(RANKED, relevant, k) == pytest.approx(expected)


def _dcg(gains: list[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


@pytest.mark.parametrize(
    ("relevant", "k", "expected"),
    [
        pytest.param({"d1": 1}, 10, 1.0, id="single-at-top"),
        pytest.param({"d2": 1}, 10, 1 / math.log2(3), id="single-at-two"),
        pytest.param(
            {"d1": 1, "d3": 2, "d9": 3},
            3,
            (1 + 2 / 2) / (3 + 2 / math.log2(3) + 1 / 2),
            id="graded-with-one-unretrieved",
        ),
        pytest.param({"d1": 1, "d2": 3}, 5, _dcg([1, 3]) / _dcg([3, 1]), id="graded-wrong-order"),
        pytest.param({"d2": 3, "d1": 1}, 2, _dcg([1, 3]) / _dcg([3, 1]), id="graded-cut-at-two"),
        pytest.param({"d5": 2}, 4, 0.0, id="relevant-outside-k"),
        pytest.param({"d3": 2, "d4": 1, "d6": 5}, 1, 0.0, id="ideal-cut-at-k"),
        pytest.param({"d1": 2, "d2": 2}, 2, 1.0, id="perfect"),
        pytest.param({}, 10, 0.0, id="no-relevant"),
        pytest.param({"d1": 0}, 10, 0.0, id="only-grade-zero"),
    ],
)
def test_ndcg_at_k(relevant: dict[str, int], k: int, expected: float) -> None:
    assert ndcg_at_k(RANKED, relevant, k) == pytest.approx(expected, abs=1e-12)


def test_ndcg_value_by_hand() -> None:
    # ranked d1 (grade 1), d2 (0), d3 (2); ideal order 2, 1.
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(RANKED, {"d1": 1, "d3": 2}, 3) == pytest.approx(dcg / idcg)
    assert dcg / idcg == pytest.approx(0.7602, abs=1e-4)


def test_metrics_on_an_empty_ranking() -> None:
    assert recall_at_k([], {"d1": 1}, 10) == 0.0
    assert mrr_at_k([], {"d1": 1}, 10) == 0.0
    assert ndcg_at_k([], {"d1": 1}, 10) == 0.0


def test_mean_metrics_averages_over_judged_queries() -> None:
    runs = {"q1": ["a", "b", "c"], "q2": ["x", "y", "z"], "q3": ["a"]}
    qrels = {
        "q1": {"a": 1},  # hit at rank 1
        "q2": {"z": 1, "w": 1},  # one of two, at rank 3
        "q3": {"a": 0},  # no relevant document: left out of the mean
        "q4": {"b": 1},  # judged but not run: counts as zeros
    }
    metrics = mean_metrics(runs, qrels, k_values=[1, 3])
    assert set(metrics) == {"ndcg@1", "ndcg@3", "recall@1", "recall@3", "mrr@10"}
    assert metrics["recall@1"] == pytest.approx((1 + 0 + 0) / 3)
    assert metrics["recall@3"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics["mrr@10"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert metrics["ndcg@1"] == pytest.approx((1 + 0 + 0) / 3)
    q2_ndcg3 = (1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert metrics["ndcg@3"] == pytest.approx((1 + q2_ndcg3 + 0) / 3)


def test_mean_metrics_default_cutoffs_and_no_queries() -> None:
    metrics = mean_metrics({}, {})
    assert metrics == {"ndcg@10": 0.0, "ndcg@100": 0.0, "recall@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}


def test_mean_metrics_deduplicates_cutoffs() -> None:
    metrics = mean_metrics({"q": ["a"]}, {"q": {"a": 1}}, k_values=[5, 5, 1])
    assert metrics == {"ndcg@1": 1.0, "ndcg@5": 1.0, "recall@1": 1.0, "recall@5": 1.0, "mrr@10": 1.0}


# -- loaders -------------------------------------------------------------------------------------------


def test_load_queries(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    path.write_text(
        '{"_id": "q1", "text": "red running shoes"}\n'
        "\n"
        '{"_id": 2, "text": "coffee maker", "metadata": {}}\n'
        '{"_id": "q3", "text": "café crème"}\n',
        encoding="utf-8",
    )
    assert load_queries(path) == {"q1": "red running shoes", "2": "coffee maker", "q3": "café crème"}


def test_load_queries_of_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    path.write_text("", encoding="utf-8")
    assert load_queries(path) == {}


@pytest.mark.parametrize(
    "line",
    ['{"_id": "q2"}', '{"text": "no id"}', "{not json", '["q2", "text"]'],
    ids=["no-text", "no-id", "bad-json", "not-an-object"],
)
def test_load_queries_schema_errors_name_the_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "queries.jsonl"
    path.write_text('{"_id": "q1", "text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(SchemaError, match="line 2"):
        load_queries(path)


def test_load_qrels(tmp_path: Path) -> None:
    path = tmp_path / "test.tsv"
    path.write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\n\nq2\td1\t0\nq3\td9\t1.0\n",
        encoding="utf-8",
    )
    assert load_qrels(path) == {"q1": {"d1": 1, "d2": 2}, "q2": {"d1": 0}, "q3": {"d9": 1}}


def test_load_qrels_header_only(tmp_path: Path) -> None:
    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\n", encoding="utf-8")
    assert load_qrels(path) == {}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        pytest.param("q1\td1\n", "line 2", id="two-fields"),
        pytest.param("q1\td1\t1\nq2\td2\thigh\n", "line 3", id="non-numeric-grade"),
        pytest.param("q1 d1 1\n", "line 2", id="spaces-not-tabs"),
    ],
)
def test_load_qrels_schema_errors_name_the_line(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\n" + body, encoding="utf-8")
    with pytest.raises(SchemaError, match=needle):
        load_qrels(path)


def test_load_qrels_of_an_empty_file_is_a_schema_error(tmp_path: Path) -> None:
    path = tmp_path / "test.tsv"
    path.write_text("", encoding="utf-8")
    with pytest.raises(SchemaError, match="is empty"):
        load_qrels(path)


@pytest.mark.parametrize("loader", [load_queries, load_qrels], ids=["queries", "qrels"])
@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_loaders_input_file_errors(tmp_path: Path, loader: Any, kind: str) -> None:
    path = tmp_path / "input"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(InputFileError, match=r"cannot read (queries|qrels) file"):
        loader(path)


@pytest.mark.parametrize(
    ("loader", "content"),
    [
        (load_queries, '{"_id": "q1", "text": "caf\xe9"}\n'),
        (load_qrels, "query-id\tcorpus-id\tscore\nq\xe9\td1\t1\n"),
    ],
    ids=["queries", "qrels"],
)
def test_loaders_report_a_wrong_encoding_as_input_file_error(tmp_path: Path, loader: Any, content: str) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(InputFileError):
        loader(path)


# -- evaluate() ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_queries() -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Every title as a query, judged relevant to its own row."""
    catalogue = make_catalogue()
    queries = {f"q{i}": title for i, title in zip(catalogue["id"], catalogue["title"], strict=True)}
    qrels = {f"q{i}": {str(i): 1} for i in catalogue["id"]}
    return queries, qrels


def test_evaluate_titles_as_queries_finds_every_title(built_bundle: Any, self_queries: Any) -> None:
    queries, qrels = self_queries
    report = evaluate(built_bundle, queries, qrels, k_values=[1, 10])
    assert isinstance(report, EvalReport)
    assert report.queries == 40
    for metrics in (report.retrieval, report.reranked):
        assert metrics["recall@10"] == 1.0
        assert metrics["recall@1"] == 1.0
        assert metrics["mrr@10"] == 1.0
        assert metrics["ndcg@10"] == pytest.approx(1.0)


def test_evaluate_uses_only_queries_with_text_and_judgements(built_bundle: Any, self_queries: Any) -> None:
    queries, qrels = self_queries
    some = dict(list(queries.items())[:5])
    qrels = {**qrels, "ghost": {"1000": 1}}
    report = evaluate(built_bundle, some, qrels, k_values=[10])
    assert report.queries == 5
    assert report.retrieval["recall@10"] == 1.0


def test_evaluate_wrong_document_ids_score_zero(built_bundle: Any, self_queries: Any) -> None:
    queries, _ = self_queries
    qrels = {q: {"not-a-doc": 1} for q in queries}
    report = evaluate(built_bundle, queries, qrels, k_values=[10])
    assert report.retrieval == {"ndcg@10": 0.0, "recall@10": 0.0, "mrr@10": 0.0}


def test_evaluate_without_overlapping_ids_is_a_schema_error(built_bundle: Any) -> None:
    with pytest.raises(SchemaError, match="ids match"):
        evaluate(built_bundle, {"a": "yoga mat"}, {"b": {"1000": 1}})


def test_report_table_lists_every_metric() -> None:
    report = EvalReport(
        queries=3, retrieval={"recall@10": 0.5, "mrr@10": 0.25}, reranked={"recall@10": 1.0, "mrr@10": 0.5}
    )
    lines = report.table().splitlines()
    assert lines[0].split() == ["metric", "retrieval", "reranked"]
    assert lines[1].split() == ["recall@10", "0.5000", "1.0000"]
    assert lines[2].split() == ["mrr@10", "0.2500", "0.5000"]
    assert lines[-1] == "(3 queries)"
    json.dumps(report.retrieval)


# -- evaluate_pairs() ----------------------------------------------------------------------------------


def _pairs() -> Any:
    import pandas as pd

    titles = make_catalogue()["title"].tolist()
    queries = [t.split(" ", 1)[1] for t in titles[:10]]
    return pd.DataFrame({"query": queries * 2, "title": titles[:10] + titles[10:20], "label": [1] * 10 + [0] * 10})


def test_evaluate_pairs_gives_every_signal_by_hand(built_bundle: Any) -> None:
    import numpy as np

    from matching.evaluate import evaluate_pairs
    from matching.metrics import roc_auc

    pairs = _pairs()
    queries, titles, y = pairs["query"].tolist(), pairs["title"].tolist(), pairs["label"].to_numpy()
    report = evaluate_pairs(built_bundle, pairs)
    q, t = built_bundle.encode_pairs(queries, titles)
    lex = built_bundle.snapshot.lexical_features(queries, titles)
    assert report.metric == "roc_auc"
    assert report.pairs == 20
    assert report.signals["cosine"] == pytest.approx(roc_auc(y, np.einsum("ij,ij->i", q, t)))
    assert report.signals["lexical"] == pytest.approx(roc_auc(y, lex[:, 0]))
    untrained = roc_auc(y, built_bundle.score_pairs(queries, titles))
    assert report.signals["fused"] == pytest.approx(untrained)
    assert report.signals["reranker"] == pytest.approx(untrained)
    assert not report.trained
    lines = report.table().splitlines()
    assert lines[0].split() == ["signal", "roc_auc"]
    assert [line.split()[0] for line in lines[1:5]] == ["cosine", "lexical", "fused", "reranker"]


def test_evaluate_pairs_of_graded_labels_is_spearman(built_bundle: Any) -> None:
    from matching.evaluate import evaluate_pairs
    from matching.metrics import spearman

    pairs = _pairs().assign(label=[4.0, 3.5] * 5 + [1.0, 0.5] * 5)
    report = evaluate_pairs(built_bundle, pairs)
    assert report.metric == "spearman"
    scores = built_bundle.score_pairs(pairs["query"].tolist(), pairs["title"].tolist())
    assert report.signals["fused"] == pytest.approx(spearman(scores, pairs["label"].to_numpy()))
