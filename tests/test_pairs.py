"""Pair metrics by hand, ``Matcher.score_pairs``/``encode_pairs``, and batch scoring of files (API and CLI)."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import assert_same_file, build_products, hidden_entries, make_catalogue

from matching.cli import main
from matching.config import ScorerConfig
from matching.errors import ConfigError, InputFileError, SchemaError
from matching.matcher import Matcher
from matching.metrics import best_threshold, classification_metrics, pearson, rankdata, roc_auc, spearman
from matching.pairs import score_file
from matching.scorer import Scorer
from matching.search import Snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CATALOGUE_TITLES = make_catalogue()["title"].tolist()
UNSEEN_TITLES = ["a blue umbrella for travel", "portable bluetooth speaker", "Hooli wooden chair"]


# -- pair metrics, against hand-computed values ----------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([10, 20, 20, 5], [2.0, 3.5, 3.5, 1.0]),
        ([3, 1, 2], [3.0, 1.0, 2.0]),
        ([7, 7, 7], [2.0, 2.0, 2.0]),
        ([1, 2, 2, 2, 0], [2.0, 4.0, 4.0, 4.0, 1.0]),
        ([-1.5, 0.0, -1.5, 0.0], [1.5, 3.5, 1.5, 3.5]),
        ([], []),
    ],
    ids=["pair-tie", "no-ties", "all-tied", "triple-tie", "two-ties", "empty"],
)
def test_rankdata_gives_ties_their_average_rank(values: list[float], expected: list[float]) -> None:
    ranks = rankdata(np.asarray(values, dtype=float))
    assert ranks.dtype == np.float64
    assert ranks.tolist() == expected


def test_spearman_of_monotone_and_reversed_pairs() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([0.1, 5.0, 7.0, 100.0, 1e6])  # monotone but far from linear
    assert spearman(x, y) == pytest.approx(1.0, abs=1e-12)
    assert spearman(x, -y) == pytest.approx(-1.0, abs=1e-12)
    assert pearson(x, y) < 0.99  # Pearson is not fooled into 1 by the non-linear relation


def test_spearman_with_ties_by_hand() -> None:
    # ranks of x: [1, 2.5, 2.5, 4]; ranks of y: [1, 2, 3, 4] -> Pearson of the ranks by hand
    x, y = np.array([1.0, 2.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0, 40.0])
    rx, ry = np.array([1, 2.5, 2.5, 4]) - 2.5, np.array([1, 2, 3, 4]) - 2.5
    expected = (rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum())
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(4.5 / np.sqrt(4.5 * 5.0))


def test_correlations_of_a_constant_are_zero_not_nan() -> None:
    assert pearson(np.ones(4), np.arange(4.0)) == 0.0
    assert spearman(np.ones(4), np.arange(4.0)) == 0.0


def test_roc_auc_by_hand_with_a_tie() -> None:
    # positives 0.8 and 0.4, negatives 0.4 and 0.1: (1 + 1) + (0.5 + 1) = 3.5 of 4 pairs
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.8, 0.4, 0.4, 0.1])
    assert roc_auc(labels, scores) == pytest.approx(0.875)


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 1.0),
        ([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], 0.0),
        ([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5], 0.5),
        ([1, 1, 1], [0.1, 0.2, 0.3], 0.5),  # one class only: undefined, reported as chance
        ([0, 0], [0.1, 0.2], 0.5),
        ([2, 0, 5, 0], [0.9, 0.1, 0.8, 0.2], 1.0),  # any label > 0 is a positive
    ],
    ids=["perfect", "reversed", "all-tied", "only-positives", "only-negatives", "graded-labels"],
)
def test_roc_auc_edge_cases(labels: list[int], scores: list[float], expected: float) -> None:
    assert roc_auc(np.array(labels), np.array(scores)) == pytest.approx(expected)


def test_best_threshold_maximises_accuracy_by_hand() -> None:
    labels = np.array([1, 1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    # predicting the top i: i=2 and i=4 both get 5 of 6 right; the first (higher) cut is taken
    threshold = best_threshold(labels, scores)
    assert threshold == pytest.approx(0.75)
    metrics = classification_metrics(labels, scores, threshold)
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["f1"] == pytest.approx(0.8)  # tp 2, fp 0, fn 1 -> 4 / 5
    assert metrics["roc_auc"] == pytest.approx(8 / 9)  # 0.6 loses only to the negative 0.7


def test_best_threshold_does_not_depend_on_input_order() -> None:
    labels = np.array([1, 1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    perm = np.array([4, 0, 5, 2, 1, 3])
    assert best_threshold(labels[perm], scores[perm]) == best_threshold(labels, scores)


@pytest.mark.parametrize(
    ("labels", "predicted"),
    [([1, 1, 1], [True, True, True]), ([0, 0, 0], [False, False, False])],
    ids=["all-positive", "all-negative"],
)
def test_best_threshold_for_one_class(labels: list[int], predicted: list[bool]) -> None:
    scores = np.array([0.2, 0.9, 0.5])
    threshold = best_threshold(np.array(labels), scores)
    assert (scores >= threshold).tolist() == predicted
    assert classification_metrics(np.array(labels), scores, threshold)["accuracy"] == 1.0


def test_classification_metrics_by_hand() -> None:
    labels = np.array([1, 0, 1, 0, 1])
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.6])
    # at 0.5: predicted [1, 1, 0, 0, 1]; tp 2, fp 1, fn 1, tn 1
    m = classification_metrics(labels, scores, 0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["roc_auc"] == pytest.approx(roc_auc(labels, scores))
    # the threshold is inclusive: score == threshold predicts positive
    assert classification_metrics(labels, scores, 0.9)["f1"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 2))
    # nothing predicted positive: F1 is 0, not a division by zero
    assert classification_metrics(labels, scores, 2.0) == {"accuracy": 0.4, "f1": 0.0, "roc_auc": m["roc_auc"]}


def _best_accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    cuts = [*np.unique(scores), np.max(scores) + 1.0]
    return max(classification_metrics(labels, scores, c)["accuracy"] for c in cuts)


def test_best_threshold_with_tied_scores_reaches_the_best_accuracy() -> None:
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.9, 0.5, 0.5, 0.5])
    # thresholds in (0.5, 0.9] get 3 of 4 right; 0.5 (the tie) predicts everything positive: 2 of 4
    threshold = best_threshold(labels, scores)
    assert classification_metrics(labels, scores, threshold)["accuracy"] == _best_accuracy(labels, scores) == 0.75


# -- score_pairs / encode_pairs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> Any:
    matcher = build_products(tmp_path_factory.mktemp("pairs-bundle") / "products", tiny_encoder)
    yield matcher
    matcher.close()


def cosine(q: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", q.astype(np.float64), t.astype(np.float64))


def test_score_pairs_rejects_unequal_lengths(pairs_bundle: Matcher) -> None:
    with pytest.raises(ConfigError, match=r"differ in length \(2 != 1\)"):
        pairs_bundle.score_pairs(["a", "b"], ["c"])


@pytest.mark.parametrize(
    ("queries", "titles", "needle"),
    [
        (["ok", 3], ["t", "u"], "queries[1] is int"),
        (["ok", "fine"], ["t", None], "titles[1] is NoneType"),
        ([b"bytes"], ["t"], "queries[0] is bytes"),
        (["q"], [float("nan")], "titles[0] is float"),
    ],
    ids=["int-query", "none-title", "bytes-query", "nan-title"],
)
def test_score_pairs_rejects_non_strings(
    pairs_bundle: Matcher, queries: list[Any], titles: list[Any], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        pairs_bundle.score_pairs(queries, titles)
    assert needle in str(info.value)


def test_score_pairs_of_nothing_is_an_empty_float32_array(pairs_bundle: Matcher) -> None:
    scores = pairs_bundle.score_pairs([], [])
    assert scores.shape == (0,)
    assert scores.dtype == np.float32


def test_cached_titles_reuse_the_stored_vectors(pairs_bundle: Matcher) -> None:
    titles = [CATALOGUE_TITLES[5], CATALOGUE_TITLES[31]]
    _, t = pairs_bundle.encode_pairs(["q", "q"], titles)
    rows = pairs_bundle.store.find_titles(titles)
    assert None not in rows
    assert np.array_equal(t, np.asarray(pairs_bundle.store.vectors[rows]))


def test_cached_title_vectors_equal_fresh_encodings(pairs_bundle: Matcher, tiny_encoder: Any) -> None:
    titles = CATALOGUE_TITLES[::3]
    _, t = pairs_bundle.encode_pairs(["x"] * len(titles), titles)
    np.testing.assert_allclose(t, tiny_encoder.encode_titles(titles), atol=1e-5, rtol=0)


def test_cached_and_uncached_scoring_agree(pairs_bundle: Matcher, monkeypatch: pytest.MonkeyPatch) -> None:
    queries = ["red running shoes", "coffee", "red running shoes", "Acme desk lamp"]
    titles = [CATALOGUE_TITLES[9], CATALOGUE_TITLES[2], CATALOGUE_TITLES[17], CATALOGUE_TITLES[6]]
    cached = pairs_bundle.score_pairs(queries, titles)
    calls: list[list[str]] = []
    real_encode = pairs_bundle.encoder.encode_titles

    def spy(texts: list[str], **kw: Any) -> np.ndarray:
        calls.append(list(texts))
        return real_encode(texts, **kw)

    monkeypatch.setattr(pairs_bundle.encoder, "encode_titles", spy)
    pairs_bundle.score_pairs(queries, titles)
    assert calls == []  # every title was found in the bundle: nothing was encoded
    # a store that knows no title: every title is encoded afresh
    monkeypatch.setattr(pairs_bundle.store, "find_titles", lambda ts: [None] * len(ts))
    uncached = pairs_bundle.score_pairs(queries, titles)
    assert calls == [list(dict.fromkeys(titles))]
    np.testing.assert_allclose(uncached, cached, atol=1e-5, rtol=0)


def test_mixed_cached_and_unseen_titles_keep_input_order(pairs_bundle: Matcher, tiny_encoder: Any) -> None:
    titles = [UNSEEN_TITLES[0], CATALOGUE_TITLES[0], UNSEEN_TITLES[1], CATALOGUE_TITLES[0], UNSEEN_TITLES[0]]
    queries = ["blue umbrella", "headphones", "speaker", "black headphones", "blue umbrella"]
    q, t = pairs_bundle.encode_pairs(queries, titles)
    np.testing.assert_allclose(q, tiny_encoder.encode_queries(queries), atol=1e-5, rtol=0)
    np.testing.assert_allclose(t, tiny_encoder.encode_titles(titles), atol=1e-5, rtol=0)
    scores = pairs_bundle.score_pairs(queries, titles)
    assert scores[0] == scores[4]  # same pair twice, same score


def test_untrained_scorer_scores_the_cosine(pairs_bundle: Matcher) -> None:
    queries = ["black wireless headphones", "a man is riding a horse", "yoga", "Globex"]
    titles = [CATALOGUE_TITLES[0], UNSEEN_TITLES[2], CATALOGUE_TITLES[5], UNSEEN_TITLES[1]]
    scores = pairs_bundle.score_pairs(queries, titles)
    assert scores.dtype == np.float32
    q, t = pairs_bundle.encode_pairs(queries, titles)
    np.testing.assert_allclose(scores, cosine(q, t), atol=1e-6, rtol=0)


def test_repeated_queries_and_calls_give_identical_scores(pairs_bundle: Matcher) -> None:
    queries = ["red running shoes"] * 3 + ["coffee maker"] + ["red running shoes"]
    titles = [CATALOGUE_TITLES[1], UNSEEN_TITLES[0], CATALOGUE_TITLES[1], CATALOGUE_TITLES[2], UNSEEN_TITLES[0]]
    first = pairs_bundle.score_pairs(queries, titles)
    again = pairs_bundle.score_pairs(queries, titles)
    assert np.array_equal(first, again)
    assert first[0] == first[2]
    assert first[1] == first[4]


def test_score_pairs_uses_the_bundle_scorer(pairs_bundle: Matcher, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    torch.manual_seed(3)
    scorer = Scorer(ScorerConfig(dim=pairs_bundle.encoder.dim, hidden=16, dropout=0.0))
    torch.nn.init.normal_(scorer.mlp[-1].weight, std=0.5)
    monkeypatch.setattr(pairs_bundle, "scorer", scorer.eval())
    queries, titles = ["red shoes", "lamp"], [CATALOGUE_TITLES[1], UNSEEN_TITLES[2]]
    q, t = pairs_bundle.encode_pairs(queries, titles)
    scores = pairs_bundle.score_pairs(queries, titles)
    assert np.array_equal(scores, scorer.score(q, t))
    assert not np.allclose(scores, cosine(q, t), atol=1e-4)


# -- score_file (API) ------------------------------------------------------------------------------------

PAIR_ROWS = [
    {"code": "007", "query": "black wireless headphones", "title": CATALOGUE_TITLES[0], "note": ""},
    {"code": "0010", "query": "red running shoes", "title": UNSEEN_TITLES[0], "note": "NA"},
    {"code": "1e3", "query": "coffee", "title": CATALOGUE_TITLES[2], "note": "a, quoted note"},
    {"code": "-0", "query": "red running shoes", "title": CATALOGUE_TITLES[9], "note": "nan"},
    {"code": "3.10", "query": "yoga mat", "title": UNSEEN_TITLES[1], "note": "  padded  "},
    {"code": "True", "query": "a lamp", "title": CATALOGUE_TITLES[6], "note": "x"},
    {"code": "0x1F", "query": "black wireless headphones", "title": UNSEEN_TITLES[2], "note": "null"},
]


def write_pairs(path: Path, rows: list[dict[str, str]] = PAIR_ROWS, sep: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=sep)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_text_table(path: Path, sep: str = ",") -> pd.DataFrame:
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)


def check_scored(matcher: Matcher, out: Path, rows: list[dict[str, str]] = PAIR_ROWS, sep: str = ",") -> None:
    """``out`` holds every input row and column, in order, as text, then score and cosine."""
    got = read_text_table(out, sep)
    assert list(got.columns) == [*rows[0], "score", "cosine"]
    expected = pd.DataFrame(rows, dtype=str)
    pd.testing.assert_frame_equal(got[list(rows[0])], expected)
    queries, titles = [r["query"] for r in rows], [r["title"] for r in rows]
    q, t = matcher.encode_pairs(queries, titles)
    np.testing.assert_allclose(got["score"].astype(float), matcher.score_pairs(queries, titles), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["cosine"].astype(float), cosine(q, t), rtol=1e-6, atol=1e-6)


def test_score_file_keeps_every_row_and_column_as_text(pairs_bundle: Matcher, tmp_path: Path) -> None:
    src = write_pairs(tmp_path / "pairs.csv")
    out = tmp_path / "out" / "scored.csv"
    assert score_file(pairs_bundle.snapshot, src, out, show_progress=False) == len(PAIR_ROWS)
    check_scored(pairs_bundle, out)
    assert "007," in out.read_text(encoding="utf-8")
    assert hidden_entries(out.parent) == []


@pytest.mark.parametrize("chunksize", [1, 2, 3, 7, 100])
def test_score_file_in_small_chunks_writes_the_same_file(pairs_bundle: Matcher, tmp_path: Path, chunksize: int) -> None:
    src = write_pairs(tmp_path / "pairs.csv")
    whole, chunked = tmp_path / "whole.csv", tmp_path / "chunked.csv"
    score_file(pairs_bundle.snapshot, src, whole, show_progress=False)
    assert score_file(pairs_bundle.snapshot, src, chunked, chunksize=chunksize, show_progress=False) == len(PAIR_ROWS)
    assert_same_file(chunked, whole)
    check_scored(pairs_bundle, chunked)


def test_score_file_tsv_in_and_out_with_other_column_names(pairs_bundle: Matcher, tmp_path: Path) -> None:
    rows = [{"id": r["code"], "q": r["query"], "t": r["title"]} for r in PAIR_ROWS]
    src = write_pairs(tmp_path / "pairs.tsv", rows, sep="\t")
    out = tmp_path / "scored.tsv"
    score_file(pairs_bundle.snapshot, src, out, query_column="q", title_column="t", chunksize=3, show_progress=False)
    got = read_text_table(out, "\t")
    assert list(got.columns) == ["id", "q", "t", "score", "cosine"]
    assert got["id"].tolist() == [r["code"] for r in PAIR_ROWS]
    np.testing.assert_allclose(
        got["score"].astype(float), pairs_bundle.score_pairs(got["q"].tolist(), got["t"].tolist()), rtol=1e-6
    )


def test_score_file_reads_a_bom(pairs_bundle: Matcher, tmp_path: Path) -> None:
    src = tmp_path / "bom.csv"
    src.write_text("query,title\nred shoes,Acme red shoes\n", encoding="utf-8-sig")
    out = tmp_path / "out.csv"
    assert score_file(pairs_bundle.snapshot, src, out, show_progress=False) == 1
    assert read_text_table(out).columns.tolist() == ["query", "title", "score", "cosine"]


def test_score_file_of_a_header_only_file(pairs_bundle: Matcher, tmp_path: Path) -> None:
    src = tmp_path / "empty.csv"
    src.write_text("query,title,extra\n", encoding="utf-8")
    out = tmp_path / "out.csv"
    assert score_file(pairs_bundle.snapshot, src, out, show_progress=False) == 0
    assert read_text_table(out).columns.tolist() == ["query", "title", "extra", "score", "cosine"]


@pytest.mark.parametrize(
    ("content", "error", "needle"),
    [
        (None, InputFileError, "does not exist"),
        ("", InputFileError, "is empty"),
        ("query,name\na,b\n", SchemaError, "['title']"),
        ("q,t\na,b\n", SchemaError, "['query', 'title']"),
    ],
    ids=["missing-file", "empty-file", "no-title-column", "no-columns"],
)
def test_score_file_errors_leave_no_output(
    pairs_bundle: Matcher, tmp_path: Path, content: str | None, error: type[Exception], needle: str
) -> None:
    src = tmp_path / "pairs.csv"
    if content is not None:
        src.write_text(content, encoding="utf-8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(error) as info:
        score_file(pairs_bundle.snapshot, src, out_dir / "scored.csv", show_progress=False)
    assert needle in str(info.value)
    assert list(out_dir.iterdir()) == []


def test_a_failure_mid_file_leaves_the_old_output_untouched(
    pairs_bundle: Matcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_pairs(tmp_path / "pairs.csv")
    out = tmp_path / "scored.csv"
    out.write_text("previous results\n", encoding="utf-8")
    real = Snapshot.encode_pairs
    calls = {"n": 0}

    def fail_on_third_chunk(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(Snapshot, "encode_pairs", fail_on_third_chunk)
    with pytest.raises(RuntimeError, match="boom"):
        score_file(pairs_bundle.snapshot, src, out, chunksize=2, show_progress=False)
    assert out.read_text(encoding="utf-8") == "previous results\n"
    assert hidden_entries(tmp_path) == []


def test_score_file_does_not_overwrite_an_input_score_column(pairs_bundle: Matcher, tmp_path: Path) -> None:
    src = tmp_path / "sts.csv"
    src.write_text(f"query,title,score\nred shoes,{CATALOGUE_TITLES[1]},4.5\n", encoding="utf-8")
    out = tmp_path / "out.csv"
    try:
        score_file(pairs_bundle.snapshot, src, out, show_progress=False)
    except SchemaError:
        return  # refusing is an acceptable fix
    got = read_text_table(out)
    assert "4.5" in got.to_numpy().ravel().tolist(), f"the input's score column was lost: {got.to_dict('records')}"


def test_score_file_to_a_gz_output_is_gzip(pairs_bundle: Matcher, tmp_path: Path) -> None:
    src = write_pairs(tmp_path / "pairs.csv")
    out = tmp_path / "scored.csv.gz"
    score_file(pairs_bundle.snapshot, src, out, show_progress=False)
    with gzip.open(out, "rt", encoding="utf-8") as fh:
        assert fh.readline().startswith("code,query,title")


# -- the `score` command -----------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_score(
    capsys: pytest.CaptureFixture[str], pairs_bundle: Matcher, tiny_model_dir: Path, tmp_path: Path
) -> None:
    src = write_pairs(tmp_path / "pairs.csv")
    out = tmp_path / "scored.csv"
    code, stdout, err = run(capsys, "score", pairs_bundle.path, src, "--out", out, "--model", tiny_model_dir, "-q")
    assert code == 0, err
    assert f"scored {len(PAIR_ROWS)} pairs" in stdout
    check_scored(pairs_bundle, out)
    assert "007," in out.read_text(encoding="utf-8")


def test_cli_score_in_small_chunks(
    capsys: pytest.CaptureFixture[str], pairs_bundle: Matcher, tiny_model_dir: Path, tmp_path: Path
) -> None:
    src = write_pairs(tmp_path / "pairs.csv")
    whole, chunked = tmp_path / "whole.csv", tmp_path / "chunked.csv"
    common = ["--model", tiny_model_dir, "-q"]
    assert run(capsys, "score", pairs_bundle.path, src, "--out", whole, *common)[0] == 0
    code, _, err = run(capsys, "score", pairs_bundle.path, src, "--out", chunked, "--chunksize", 2, *common)
    assert code == 0, err
    assert_same_file(chunked, whole)
    assert len(read_text_table(chunked)) == len(PAIR_ROWS)


def test_cli_score_with_named_columns(
    capsys: pytest.CaptureFixture[str], pairs_bundle: Matcher, tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = [{"left": r["query"], "right": r["title"]} for r in PAIR_ROWS]
    src = write_pairs(tmp_path / "pairs.csv", rows)
    out = tmp_path / "scored.csv"
    argv = ["--query-column", "left", "--title-column", "right", "--model", tiny_model_dir, "-q"]
    code, _, err = run(capsys, "score", pairs_bundle.path, src, "--out", out, *argv)
    assert code == 0, err
    assert read_text_table(out).columns.tolist() == ["left", "right", "score", "cosine"]


@pytest.mark.parametrize(
    ("header", "needle"),
    [("query,name", "['title']"), ("text,title", "['query']")],
    ids=["no-title", "no-query"],
)
def test_cli_score_with_a_missing_column(
    capsys: pytest.CaptureFixture[str],
    pairs_bundle: Matcher,
    tiny_model_dir: Path,
    tmp_path: Path,
    header: str,
    needle: str,
) -> None:
    src = tmp_path / "pairs.csv"
    src.write_text(f"{header}\na,b\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    out = out_dir / "scored.csv"
    code, stdout, err = run(capsys, "score", pairs_bundle.path, src, "--out", out, "--model", tiny_model_dir, "-q")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert needle in lines[0]
    assert "--query-column" in lines[0]
    assert "Traceback" not in err
    assert stdout == ""
    assert not out.exists()
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_cli_score_with_a_missing_file(
    capsys: pytest.CaptureFixture[str], pairs_bundle: Matcher, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scored.csv"
    code, _, err = run(
        capsys, "score", pairs_bundle.path, tmp_path / "nope.csv", "--out", out, "--model", tiny_model_dir, "-q"
    )
    assert code == 1
    assert err.startswith("error: ")
    assert "does not exist" in err
    assert not out.exists()
