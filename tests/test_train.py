"""Training the reranker: reading pairs, the losses, early stopping, seeds, saving, search and the `train` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import COLOURS, make_catalogue, on_cuda, same_scores, shifted_pairs
from conftest import build_products as build

from matching.bundle import POINTER_FILE, current_generation, read_manifest
from matching.cli import main
from matching.config import ScorerConfig
from matching.errors import ConfigError, SchemaError
from matching.layout import TRAIN_REPORT as TRAIN_REPORT_FILE
from matching.matcher import Matcher
from matching.metrics import roc_auc
from matching.scorer import Scorer
from matching.training.loop import TrainReport, read_pairs
from matching.training.scorer import LossKind, SearchReport, TrainConfig, search_scorer, train_scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TITLES = make_catalogue()["title"].tolist()
SEARCH_QUERIES = ["red running shoes", "black wireless headphones", "a desk lamp", "Globex yoga mat"]


@pytest.fixture(scope="module")
def train_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> Any:
    """Read-only here: tests train with the function API, which never changes the matcher."""
    matcher = build(tmp_path_factory.mktemp("train-bundle") / "products", tiny_encoder)
    yield matcher
    matcher.close()


@pytest.fixture(scope="module")
def task() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training (5 colours) and validation (2 other colours) pairs of the relabelled task: 40 + 16 queries."""
    return shifted_pairs(COLOURS[:5]), shifted_pairs(COLOURS[5:])


@pytest.fixture(scope="module")
def bce_run(train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]) -> tuple[Scorer, TrainReport]:
    train, valid = task
    # the full residual: these tests check the training itself (the published share has its own test)
    return train_scorer(train_bundle.snapshot, train, valid, epochs=10, residual_share=1.0, show_progress=False)


def state_equal(a: Scorer, b: Scorer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def valid_auc(matcher: Matcher, scorer: Scorer, valid: pd.DataFrame) -> float:
    queries, titles = valid["query"].tolist(), valid["title"].tolist()
    q, t = matcher.encode_pairs(queries, titles)
    lex = matcher.snapshot.lexical_features(queries, titles) if scorer.config.lexical else None
    return roc_auc(valid["label"].to_numpy(), scorer.score(q, t, lex))


def lex_of(matcher: Matcher, pairs: pd.DataFrame) -> np.ndarray:
    return matcher.snapshot.lexical_features(pairs["query"].tolist(), pairs["title"].tolist())


def untrained_scores(matcher: Matcher, q: np.ndarray, t: np.ndarray) -> np.ndarray:
    return Scorer(ScorerConfig(dim=matcher.encoder.dim)).score(q, t)


# -- read_pairs ----------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("frame", "config", "needle"),
    [
        (pd.DataFrame({"query": ["q"], "title": ["t"]}), TrainConfig(), "['label']"),
        (pd.DataFrame({"text": ["q"], "label": [1]}), TrainConfig(), "['query', 'title']"),
        (pd.DataFrame({"query": ["q"], "title": ["t"], "label": [1]}), TrainConfig(label_column="grade"), "['grade']"),
    ],
    ids=["no-label", "no-query-no-title", "configured-name"],
)
def test_read_pairs_names_the_missing_columns(frame: pd.DataFrame, config: TrainConfig, needle: str) -> None:
    with pytest.raises(SchemaError) as info:
        read_pairs(frame, config)
    message = str(info.value)
    assert needle in message
    assert f"its columns are {list(frame.columns)}" in message


def test_read_pairs_names_the_missing_columns_of_a_file(tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.csv", "query,name,score\na,b,1\n")
    with pytest.raises(SchemaError) as info:
        read_pairs(path, TrainConfig())
    message = str(info.value)
    assert "pairs.csv" in message
    assert "['title', 'label']" in message
    assert "['query', 'name', 'score']" in message


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("pairs.csv", "query,title,label\na,b,1\nc,d,0\ne,f,yes\n", "row 3: label 'yes' is not a number"),
        ("pairs.csv", "query,title,label\na,b,1\nc,d,\n", "row 2: label"),
        ("pairs.tsv", "query\ttitle\tlabel\na\tb\t1\nc\td\t0.5x\n", "row 2: label '0.5x' is not a number"),
        (
            "pairs.jsonl",
            '{"query": "a", "title": "b", "label": 1}\n{"query": "c", "title": "d", "label": "x"}\n',
            "row 2",
        ),
        ("pairs.csv", "query,title,label\na,b,1\n,d,0\n", "row 2: column 'query' is empty"),
        ("pairs.csv", "query,title,label\na,b,1\nc,d,0\n   ,d,0\n", "row 3: column 'query' is empty"),
        ("pairs.csv", "query,title,label\na,,1\n", "row 1: column 'title' is empty"),
        (
            "pairs.jsonl",
            '{"query": "a", "title": "b", "label": 1}\n{"query": null, "title": "d", "label": 0}\n',
            "row 2",
        ),
    ],
    ids=["word-label", "empty-label", "tsv-label", "jsonl-label", "empty-query", "blank-query", "empty-title", "null"],
)
def test_read_pairs_bad_rows_name_the_row(tmp_path: Path, name: str, text: str, needle: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(SchemaError) as info:
        read_pairs(path, TrainConfig())
    assert needle in str(info.value)
    assert name in str(info.value)


def test_read_pairs_of_a_dataframe_names_the_row() -> None:
    frame = pd.DataFrame({"query": ["a", "b", "c"], "title": ["x", "y", "z"], "label": [1, 0, "bad"]}, index=[7, 8, 9])
    with pytest.raises(SchemaError, match=r"the pairs DataFrame, row 3: label 'bad' is not a number"):
        read_pairs(frame, TrainConfig())
    frame = pd.DataFrame({"query": ["a", None], "title": ["x", "y"], "label": [1, 0]})
    with pytest.raises(SchemaError, match=r"row 2: column 'query' is empty"):
        read_pairs(frame, TrainConfig())


def test_read_pairs_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="does not exist"):
        read_pairs(tmp_path / "nope.csv", TrainConfig())


def test_read_pairs_renames_configured_columns_and_keeps_order(tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.csv", "grade,extra,left,right\n2,x,q1,t1\n0,y,q2,t2\n1.5,z,q1,t3\n")
    cfg = TrainConfig(query_column="left", title_column="right", label_column="grade")
    got = read_pairs(path, cfg)
    assert got.columns.tolist() == ["query", "title", "label"]
    assert got["query"].tolist() == ["q1", "q2", "q1"]
    assert got["title"].tolist() == ["t1", "t2", "t3"]
    assert got["label"].tolist() == [2.0, 0.0, 1.5]
    assert got["label"].dtype == np.float64


def test_read_pairs_of_a_concatenated_dataframe() -> None:
    part = pd.DataFrame({"query": ["q1", "q2"], "title": ["t1", "t2"], "label": [1, 0]})
    got = read_pairs(pd.concat([part, part]), TrainConfig())  # duplicate index labels
    assert got.index.tolist() == [0, 1, 2, 3]
    assert got["query"].tolist() == ["q1", "q2", "q1", "q2"]


def test_read_pairs_keeps_numeric_looking_text(tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.csv", "query,title,label\n0042,1.50,1\n0007,2.00,0\n")
    got = read_pairs(path, TrainConfig())
    assert got["query"].tolist() == ["0042", "0007"]
    assert got["title"].tolist() == ["1.50", "2.00"]


def test_read_pairs_rejects_an_infinite_label(tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.csv", "query,title,label\na,b,1\nc,d,inf\n")
    with pytest.raises(SchemaError, match="row 2"):
        read_pairs(path, TrainConfig())


# -- configuration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0.0},
        {"hard_negatives": -1},
        {"mine_depth": 0},
        {"valid_fraction": 1.0},
        {"valid_fraction": 0.0},
        {"loss": "hinge"},
        {"epoch": 3},
        {"hidden": 0},
        {"dropout": 1.0},
        {"residual_share": 0.0},
        {"residual_share": 1.5},
        {"residual_share": float("nan")},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_bad_settings_are_config_errors(
    train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame], settings: dict[str, Any]
) -> None:
    train, valid = task
    with pytest.raises(ConfigError):
        train_scorer(train_bundle.snapshot, train, valid, show_progress=False, **{"epochs": 1, **settings})


def test_loss_names_round_trip() -> None:
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), "loss": "cosent"})
    assert cfg.loss is LossKind.COSENT
    assert TrainConfig().to_dict()["loss"] == "auto"


# -- training beats cosine on a task cosine gets wrong ------------------------------------------------------


def test_cosine_gets_the_task_wrong(train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    _, valid = task
    q, t = train_bundle.encode_pairs(valid["query"].tolist(), valid["title"].tolist())
    assert roc_auc(valid["label"].to_numpy(), np.einsum("ij,ij->i", q, t)) < 0.5


def test_bce_training_beats_cosine(
    bce_run: tuple[Scorer, TrainReport], task: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    _, report = bce_run
    train, valid = task
    assert report.loss == "bce"
    assert report.metric == "roc_auc"
    assert report.baseline < 0.5
    assert report.best_metric > report.baseline + 0.1
    assert report.best_epoch > 0
    losses = [e["loss"] for e in report.epochs]
    assert losses[-1] < losses[0]
    assert all(np.isfinite(losses))
    assert [e["epoch"] for e in report.epochs] == list(range(1, len(report.epochs) + 1))
    assert report.train_pairs == len(train)
    assert report.valid_queries == valid["query"].nunique() == 16
    assert report.config["epochs"] == 10
    assert report.config["loss"] == "auto"


def test_the_best_checkpoint_is_returned(
    bce_run: tuple[Scorer, TrainReport], train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    scorer, report = bce_run
    assert report.best_metric == max([report.baseline] + [e["metric"] for e in report.epochs])
    assert report.best_metric == report.epochs[report.best_epoch - 1]["metric"]
    assert valid_auc(train_bundle, scorer, task[1]) == pytest.approx(report.best_metric, abs=1e-12)
    assert not scorer.training


def test_training_leaves_the_matcher_alone(
    bce_run: tuple[Scorer, TrainReport], train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    scorer, _ = bce_run
    assert train_bundle.scorer is not scorer
    valid = task[1].head(50)
    q, t = train_bundle.encode_pairs(valid["query"].tolist(), valid["title"].tolist())
    assert same_scores(
        train_bundle.score_pairs(valid["query"].tolist(), valid["title"].tolist()), untrained_scores(train_bundle, q, t)
    )


def test_report_table_and_dict(bce_run: tuple[Scorer, TrainReport]) -> None:
    _, report = bce_run
    lines = report.table().splitlines()
    assert "roc_auc" in lines[0]
    assert len(lines) == 2 + len(report.epochs) + 2
    assert lines[-2].startswith(f"best: epoch {report.best_epoch}, roc_auc {report.best_metric:.4f}")
    compared = report.compared
    assert lines[-1] == (
        f"held-out roc_auc: default {compared['default']:.4f}, linear {compared['linear']:.4f}, "
        f"mlp {compared['mlp']:.4f}; chosen: {report.chosen}"
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["best_metric"] == report.best_metric
    assert data["epochs"] == report.epochs


def test_graded_labels_train_with_mse(train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, valid = task

    # grades 1..4: the relabelled match 4, the query's own product 2, anything else 1
    def graded(frame: pd.DataFrame) -> pd.DataFrame:
        own = [t.endswith(q.split(" ", 1)[1]) for q, t in zip(frame["query"], frame["title"], strict=True)]
        return frame.assign(label=frame["label"] * 3 + 1 + np.array(own, dtype=int))

    _, report = train_scorer(train_bundle.snapshot, graded(train), graded(valid), epochs=3, show_progress=False)
    assert report.loss == "mse"
    assert report.metric == "spearman"
    assert -1.0 <= report.baseline <= 1.0
    assert report.best_metric >= report.baseline
    assert 1 <= len(report.epochs) <= 3
    assert all(np.isfinite(e["loss"]) for e in report.epochs)


def test_cosent_on_request(train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, valid = task
    _, report = train_scorer(train_bundle.snapshot, train, valid, loss="cosent", epochs=2, show_progress=False)
    assert report.loss == "cosent"
    assert report.metric == "roc_auc"  # the metric follows the labels (0/1), not the loss
    assert report.best_metric >= report.baseline


def test_listwise_with_mined_negatives(train_bundle: Matcher) -> None:
    train = shifted_pairs(COLOURS[:5], all_titles=False)
    valid = shifted_pairs(COLOURS[5:], all_titles=False)
    _, report = train_scorer(train_bundle.snapshot, train, valid, hard_negatives=5, epochs=3, show_progress=False)
    assert report.loss == "listwise"
    assert report.metric == "ndcg@10"
    assert 0.0 <= report.baseline <= 1.0
    assert report.best_metric >= report.baseline
    assert report.valid_queries == 16
    assert 1 <= len(report.epochs) <= 3


def test_listwise_needs_a_negative(train_bundle: Matcher) -> None:
    positives = pd.DataFrame({"query": ["a lamp", "shoes", "mug"], "title": TITLES[:3], "label": [1, 1, 1]})
    with pytest.raises(SchemaError, match="positive and at least one negative"):
        train_scorer(
            train_bundle.snapshot,
            positives,
            positives,
            loss="listwise",
            hard_negatives=0,
            epochs=1,
            show_progress=False,
        )


def test_a_validation_split_is_made_by_query(train_bundle: Matcher) -> None:
    pairs = shifted_pairs(COLOURS[:5], all_titles=False)  # 40 queries, 10 pairs each
    _, report = train_scorer(train_bundle.snapshot, pairs, epochs=1, valid_fraction=0.25, show_progress=False)
    assert report.valid_queries == 10
    assert report.train_pairs == 30 * 10


def test_one_query_cannot_be_split(train_bundle: Matcher) -> None:
    pairs = pd.DataFrame({"query": ["lamp"] * 2, "title": TITLES[:2], "label": [1, 0]})
    with pytest.raises(SchemaError, match="too few distinct queries"):
        train_scorer(train_bundle.snapshot, pairs, epochs=1, show_progress=False)


# -- seeds ----------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_scorer(train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, valid = task
    a, ra = train_scorer(train_bundle.snapshot, train, valid, epochs=3, seed=5, show_progress=False)
    torch.manual_seed(12345)  # global RNG state in between must not matter
    np.random.seed(54321)
    b, rb = train_scorer(train_bundle.snapshot, train, valid, epochs=3, seed=5, show_progress=False)
    assert state_equal(a, b)
    assert ra.epochs == rb.epochs
    assert (ra.baseline, ra.best_metric, ra.best_epoch) == (rb.baseline, rb.best_metric, rb.best_epoch)
    c, _ = train_scorer(train_bundle.snapshot, train, valid, epochs=3, seed=6, show_progress=False)
    assert not state_equal(a, c)


def test_the_same_seed_gives_the_same_split(train_bundle: Matcher) -> None:
    pairs = shifted_pairs(COLOURS[:3], all_titles=False)
    a, ra = train_scorer(train_bundle.snapshot, pairs, epochs=2, seed=1, show_progress=False)
    b, rb = train_scorer(train_bundle.snapshot, pairs, epochs=2, seed=1, show_progress=False)
    assert state_equal(a, b)
    assert ra.epochs == rb.epochs


# -- early stopping ---------------------------------------------------------------------------------------


def test_an_absurd_learning_rate_never_ends_worse_than_the_baseline(
    train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    train, valid = task
    scorer, report = train_scorer(
        train_bundle.snapshot, train, valid, lr=10.0, epochs=6, patience=2, residual_share=1.0, show_progress=False
    )
    assert report.best_metric >= report.baseline
    assert report.best_metric == max([report.baseline] + [e["metric"] for e in report.epochs])
    assert len(report.epochs) <= report.best_epoch + 2  # stopped after `patience` epochs without progress
    assert valid_auc(train_bundle, scorer, valid) == pytest.approx(report.best_metric, abs=1e-12)
    if report.best_epoch == 0:
        q, t = train_bundle.encode_pairs(valid["query"].tolist(), valid["title"].tolist())
        assert same_scores(scorer.score(q, t, lex_of(train_bundle, valid)), untrained_scores(train_bundle, q, t))


def test_when_no_epoch_beats_cosine_the_scorer_stays_cosine(train_bundle: Matcher) -> None:
    # each title as its own query: cosine already separates the pairs perfectly (ROC-AUC 1.0)
    rows = []
    for i, title in enumerate(TITLES):
        rows.append({"query": title, "title": title, "label": 1})
        rows += [{"query": title, "title": TITLES[(i + j) % len(TITLES)], "label": 0} for j in (1, 8, 13)]
    pairs = pd.DataFrame(rows)
    train, valid = pairs.iloc[: 4 * 30], pairs.iloc[4 * 30 :]
    scorer, report = train_scorer(
        train_bundle.snapshot, train, valid, lr=10.0, epochs=3, patience=2, show_progress=False
    )
    assert report.baseline == 1.0
    assert report.best_epoch == 0
    assert report.best_metric == 1.0
    assert len(report.epochs) == 2  # patience 2: stopped after two epochs that did not beat it
    q, t = train_bundle.encode_pairs(valid["query"].tolist(), valid["title"].tolist())
    scores = scorer.score(q, t, lex_of(train_bundle, valid))
    assert same_scores(scores, untrained_scores(train_bundle, q, t))
    np.testing.assert_allclose(scores, np.einsum("ij,ij->i", q, t), atol=1e-6, rtol=0)


def test_a_diverged_scorer_is_never_kept(train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, valid = task
    scorer, report = train_scorer(train_bundle.snapshot, train, valid, lr=1e6, epochs=2, show_progress=False)
    q, t = train_bundle.encode_pairs(valid["query"].tolist(), valid["title"].tolist())
    assert np.isfinite(scorer.score(q, t, lex_of(train_bundle, valid))).all(), (
        f"best epoch {report.best_epoch} of {report.epochs}"
    )
    assert all(torch.isfinite(v).all() for v in scorer.state_dict().values())


# -- saving and reloading ----------------------------------------------------------------------------------


def same_hits(a: list[list[tuple[Any, str, float, float]]], b: list[list[tuple[Any, str, float, float]]]) -> bool:
    """Equal hit lists (on CUDA: the same ids and titles, scores equal to 1e-5)."""
    if not on_cuda():
        return a == b
    ids = [[h[:2] for h in hits] for hits in a] == [[h[:2] for h in hits] for hits in b]
    scores = [[h[2:] for h in hits] for hits in a], [[h[2:] for h in hits] for hits in b]
    return ids and same_scores(*scores)


def hits_of(matcher: Matcher) -> list[list[tuple[Any, str, float, float]]]:
    return [
        [(h.id, h.title, h.score, h.retrieval_score) for h in hits]
        for hits in matcher.search_batch(SEARCH_QUERIES, k=8, candidates=40)
    ]


def test_a_saved_scorer_reloads_identically(
    own_bundle: Matcher, tiny_encoder: Any, task: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    train, valid = task
    report = own_bundle.train_scorer(train, valid, save=False, epochs=5, show_progress=False)
    assert report.best_epoch > 0
    queries, titles = valid["query"].tolist(), valid["title"].tolist()
    in_memory, hits = own_bundle.score_pairs(queries, titles), hits_of(own_bundle)
    q, t = own_bundle.encode_pairs(queries, titles)
    assert not np.allclose(in_memory, untrained_scores(own_bundle, q, t), atol=1e-4)  # really trained

    own_bundle.replace_scorer(own_bundle.scorer, report.to_dict())
    assert same_scores(own_bundle.score_pairs(queries, titles), in_memory)
    with Matcher.load(own_bundle.path, encoder=tiny_encoder) as reloaded:  # verify=True: checksums hold
        assert same_scores(reloaded.score_pairs(queries, titles), in_memory)
        assert same_hits(hits_of(reloaded), hits)
        assert state_equal(reloaded.scorer, own_bundle.scorer)


def test_train_scorer_with_save_publishes_the_scorer_and_its_report(
    own_bundle: Matcher, tiny_encoder: Any, task: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    train, valid = task
    path = own_bundle.path
    assert path is not None
    before = current_generation(path)
    vectors_before = (before / "vectors.f32").read_bytes()
    report = own_bundle.train_scorer(train, valid, epochs=4, show_progress=False)

    gen = current_generation(path)
    assert gen.name != before.name
    manifest = read_manifest(gen, verify=True)
    assert TRAIN_REPORT_FILE in manifest.files
    assert {"scorer.safetensors", "scorer.json", "vectors.f32"} <= set(manifest.files)
    assert json.loads((gen / TRAIN_REPORT_FILE).read_text(encoding="utf-8")) == json.loads(json.dumps(report.to_dict()))
    assert (gen / "vectors.f32").read_bytes() == vectors_before

    # the published scorer is the one the same settings train, and the live matcher uses it
    expected, _ = train_scorer(own_bundle.snapshot, train, valid, epochs=4, show_progress=False)
    assert state_equal(own_bundle.scorer, expected)
    queries, titles = valid["query"].tolist(), valid["title"].tolist()
    with Matcher.load(path, encoder=tiny_encoder) as reloaded:
        assert state_equal(reloaded.scorer, expected)
        assert same_scores(reloaded.score_pairs(queries, titles), own_bundle.score_pairs(queries, titles))
        assert same_hits(hits_of(reloaded), hits_of(own_bundle))

    # training again replaces the report
    again = own_bundle.train_scorer(train, valid, epochs=2, show_progress=False)
    gen2 = current_generation(path)
    saved = json.loads((gen2 / TRAIN_REPORT_FILE).read_text(encoding="utf-8"))
    assert saved["config"]["epochs"] == 2
    assert len(saved["epochs"]) == len(again.epochs)
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("gen-")) == [gen2.name]


# -- hyper-parameter search ---------------------------------------------------------------------------------


def test_search_scorer_with_two_trials(train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, valid = task
    space = {"lr": [1e-3, 3e-3], "hidden": [16, 32], "hard_negatives": [3, 5]}
    scorer, report, search = search_scorer(
        train_bundle.snapshot, train, valid, trials=2, space=space, epochs=3, show_progress=False
    )
    assert isinstance(search, SearchReport)
    assert search.metric == "roc_auc" == report.metric
    assert len(search.trials) == 2
    assert [t["trial"] for t in search.trials] == [0, 1]
    # hard_negatives is searched only when mining was asked for
    assert all(set(t["settings"]) == {"lr", "hidden"} for t in search.trials)
    assert len({tuple(sorted(t["settings"].items())) for t in search.trials}) == 2
    metrics = [t["best_metric"] for t in search.trials]
    assert search.best_trial == int(np.argmax(metrics))
    assert search.best is search.trials[search.best_trial]
    assert report.best_metric == max(metrics)
    assert scorer.config.hidden == search.best["settings"]["hidden"]
    assert valid_auc(train_bundle, scorer, valid) == pytest.approx(report.best_metric, abs=1e-12)

    table = search.table()
    lines = table.splitlines()
    assert isinstance(table, str)
    assert len(lines) == 3
    for column in ("trial", "hidden", "lr", "roc_auc", "epoch"):
        assert column in lines[0]
    assert lines[1 + search.best_trial].endswith(" *")
    assert sum(line.endswith(" *") for line in lines) == 1
    assert json.loads(json.dumps(search.to_dict()))["best_trial"] == search.best_trial


def test_search_trials_are_capped_by_the_space(train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, valid = task
    _, _, search = search_scorer(
        train_bundle.snapshot, train, valid, trials=5, space={"hidden": [8, 16]}, epochs=1, show_progress=False
    )
    assert sorted(t["settings"]["hidden"] for t in search.trials) == [8, 16]


# -- the `train` command ------------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pairs_csv(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.csv"
    shifted_pairs(COLOURS[:3], all_titles=False).to_csv(path, index=False)
    return path


def test_cli_train(
    capsys: pytest.CaptureFixture[str], own_bundle: Matcher, tiny_model_dir: Path, pairs_csv: Path
) -> None:
    code, out, err = run(capsys, "train", own_bundle.path, pairs_csv, "--model", tiny_model_dir, "--epochs", 2, "-q")
    assert code == 0, err
    assert "scorer:" in out
    assert f"saved into {own_bundle.path}" in out
    gen = current_generation(Path(str(own_bundle.path)))
    manifest = read_manifest(gen, verify=True)
    assert TRAIN_REPORT_FILE in manifest.files
    saved = json.loads((gen / TRAIN_REPORT_FILE).read_text(encoding="utf-8"))
    assert saved["config"]["epochs"] == 2
    assert saved["loss"] == "bce"
    assert 1 <= len(saved["epochs"]) <= 2


def test_cli_train_with_options_and_a_validation_file(
    capsys: pytest.CaptureFixture[str], own_bundle: Matcher, tiny_model_dir: Path, pairs_csv: Path, tmp_path: Path
) -> None:
    valid = tmp_path / "valid.tsv"
    frame = shifted_pairs(COLOURS[5:], all_titles=False).rename(columns={"label": "grade"})
    frame.to_csv(valid, sep="\t", index=False)
    train = tmp_path / "train.csv"
    pd.read_csv(pairs_csv).rename(columns={"label": "grade"}).to_csv(train, index=False)
    argv = ["--valid", valid, "--label-column", "grade", "--loss", "mse", "--hidden", 16, "--lr", 0.003]
    code, _, err = run(capsys, "train", own_bundle.path, train, *argv, "--epochs", 2, "--model", tiny_model_dir, "-q")
    assert code == 0, err
    saved = json.loads((current_generation(Path(str(own_bundle.path))) / TRAIN_REPORT_FILE).read_text("utf-8"))
    assert saved["loss"] == "mse"
    assert saved["metric"] == "roc_auc"
    assert saved["valid_queries"] == 16
    assert saved["config"]["hidden"] == 16
    assert saved["config"]["lr"] == 0.003
    assert saved["config"]["label_column"] == "grade"


def test_cli_train_with_search(
    capsys: pytest.CaptureFixture[str], own_bundle: Matcher, tiny_model_dir: Path, pairs_csv: Path
) -> None:
    code, out, err = run(
        capsys, "train", own_bundle.path, pairs_csv, "--search", 2, "--epochs", 1, "--model", tiny_model_dir, "-q"
    )
    assert code == 0, err
    saved = json.loads((current_generation(Path(str(own_bundle.path))) / TRAIN_REPORT_FILE).read_text("utf-8"))
    assert len(saved["search"]["trials"]) == 2
    assert saved["best_metric"] == max(t["best_metric"] for t in saved["search"]["trials"])
    assert "trial" in out


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("query,title\na,b\n", "['label']"),
        ("query,title,label\na,b,1\nc,d,maybe\n", "row 2"),
    ],
    ids=["no-label-column", "bad-label"],
)
def test_cli_train_errors_leave_the_bundle_alone(
    capsys: pytest.CaptureFixture[str],
    own_bundle: Matcher,
    tiny_model_dir: Path,
    tmp_path: Path,
    text: str,
    needle: str,
) -> None:
    path = Path(str(own_bundle.path))
    pointer = (path / POINTER_FILE).read_text(encoding="utf-8")
    entries = sorted(p.name for p in path.iterdir())
    bad = write(tmp_path / "bad.csv", text)
    code, _, err = run(capsys, "train", path, bad, "--model", tiny_model_dir, "--epochs", 1, "-q")
    assert code == 1
    assert err.startswith("error: ")
    assert needle in err
    assert "Traceback" not in err
    assert (path / POINTER_FILE).read_text(encoding="utf-8") == pointer
    assert sorted(p.name for p in path.iterdir()) == entries


# -- publish only a winner -----------------------------------------------------------------------------------


def test_a_trainer_that_cannot_beat_the_default_publishes_nothing(
    tmp_path: Path, tiny_encoder: Any, task: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    """Validation pairs the untrained default already orders perfectly (a title against itself, against another
    product): nothing learned can beat it beyond chance, so no generation is written and the report says so."""
    matcher = build(tmp_path / "products", tiny_encoder)
    train, _ = task
    titles = TITLES[:12]
    valid = pd.DataFrame(
        {
            "query": titles * 2,
            "title": titles + titles[6:] + titles[:6],
            "label": [1] * len(titles) + [0] * len(titles),
        }
    )
    default = roc_auc(valid["label"].to_numpy(), matcher.score_pairs(valid["query"].tolist(), valid["title"].tolist()))
    assert default == 1.0
    before = current_generation(matcher.path).name
    report = matcher.train_scorer(train, valid, epochs=3, show_progress=False)
    assert report.chosen == "default"
    assert report.compared["default"] == pytest.approx(1.0)
    assert (report.best_metric, report.best_epoch) == (report.compared["default"], 0)  # the report of what stays
    assert set(report.compared) == {"default", "linear", "mlp", "linear (full residual)", "mlp (full residual)"}
    assert "nothing is published" in report.table().splitlines()[-1]
    assert current_generation(matcher.path).name == before
    assert not matcher.scorer.trained
    forced = matcher.train_scorer(train, valid, epochs=3, require_win=False, show_progress=False)
    assert forced.chosen in ("linear", "mlp")
    assert forced.best_metric == max(forced.compared["linear"], forced.compared["mlp"])
    assert current_generation(matcher.path).name != before
    matcher.close()


def test_a_learned_form_is_chosen_only_when_it_wins_beyond_chance(
    train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    """The choice follows the held-out figures: a chosen form beats the default there, and the scorer returned is
    that form with that figure; a form left out either scored lower or failed the paired bootstrap."""
    train, valid = task
    scorer, report = train_scorer(train_bundle.snapshot, train, valid, epochs=10, show_progress=False)
    figures = report.compared
    assert set(figures) == {"default", "linear", "mlp", "linear (full residual)", "mlp (full residual)"}
    if report.chosen == "default":
        assert not scorer.trained
    else:
        assert figures[report.chosen] > figures["default"]
        assert scorer.config.form == report.chosen
        assert valid_auc(train_bundle, scorer, valid) == pytest.approx(figures[report.chosen], abs=1e-6)


def test_the_published_residual_is_a_share_of_the_learned_one(
    bce_run: tuple[Scorer, TrainReport], train_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    """The same seeded training published at share 0.5 scores halfway between the untrained default and the full
    residual, pair by pair; its report gives the held-out figure of what is published and the full one beside it."""
    full, full_report = bce_run
    train, valid = task
    half, report = train_scorer(train_bundle.snapshot, train, valid, epochs=10, require_win=False, show_progress=False)
    assert report.config["residual_share"] == 0.5
    assert half.config.form == full.config.form == report.chosen
    assert report.compared[f"{report.chosen} (full residual)"] == full_report.compared[report.chosen]
    assert valid_auc(train_bundle, half, valid) == pytest.approx(report.compared[report.chosen], abs=1e-12)
    assert report.best_metric == report.compared[report.chosen]
    pairs = valid.head(60)
    q, t = train_bundle.encode_pairs(pairs["query"].tolist(), pairs["title"].tolist())
    lex = lex_of(train_bundle, pairs)
    default = untrained_scores(train_bundle, q, t)
    np.testing.assert_allclose(half.score(q, t, lex), (default + full.score(q, t, lex)) / 2, atol=1e-6)
    assert "with the residual at share 0.5" in report.table()


def test_the_paired_bootstrap_by_hand() -> None:
    """Per-query values: a challenger ahead on every query wins; one that only trades places with the incumbent,
    or leads on one query of many, does not."""
    from matching.training.loop import Validator, significantly_better

    values = {"a": np.full(50, 0.5), "b": np.full(50, 0.6), "c": np.r_[np.full(49, 0.5), 1.0], "d": np.r_[0.6, 0.4]}
    values["e"] = np.r_[0.4, 0.6]

    def mean(units: np.ndarray, idx: np.ndarray | None) -> float:
        return float(np.mean(units if idx is None else units[idx]))

    validator: Validator[str] = Validator(lambda name: values[name], mean)
    assert validator("b") == pytest.approx(0.6)
    assert significantly_better(validator, "a", "b")
    assert not significantly_better(validator, "b", "a")
    assert not significantly_better(validator, "a", "c")  # ahead on average, by one query of fifty
    assert not significantly_better(validator, "d", "e")
