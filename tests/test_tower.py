"""Fine-tuning a separate query tower against the frozen title vectors, saving it, and loading it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import COLOURS, make_catalogue, shifted_pairs
from conftest import build_products as build

from matching.bundle import current_generation, read_manifest
from matching.cli import main
from matching.encoder import Encoder
from matching.errors import ConfigError, SchemaError
from matching.layout import QUERY_ENCODER as QUERY_TOWER_FILE
from matching.layout import TRAIN_REPORT as TRAIN_REPORT_FILE
from matching.matcher import Matcher
from matching.metrics import ndcg_at_k
from matching.training.tower import TowerConfig, train_query_tower

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TITLES = make_catalogue()["title"].tolist()
TOWER = {"epochs": 2, "batch_size": 4, "lr": 3e-3, "hard_negatives": 5}


@pytest.fixture(scope="module")
def tower_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> Any:
    """Read-only here: the function API returns a tower and leaves the matcher alone."""
    matcher = build(tmp_path_factory.mktemp("tower-bundle") / "products", tiny_encoder)
    yield matcher
    matcher.close()


@pytest.fixture(scope="module")
def task() -> tuple[pd.DataFrame, pd.DataFrame]:
    """32 training and 16 validation queries of the relabelled task (positives + the query's own product)."""
    return shifted_pairs(COLOURS[:4], all_titles=False), shifted_pairs(COLOURS[5:], all_titles=False)


@pytest.fixture(scope="module")
def perfect_valid() -> pd.DataFrame:
    """Each title as its own query: the untouched tower already ranks every positive first (nDCG@10 = 1)."""
    return pd.DataFrame({"query": TITLES[::4], "title": TITLES[::4], "label": 1})


@pytest.fixture(scope="module")
def tower_run(tower_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame], tiny_encoder: Any) -> Any:
    before = snapshot(tiny_encoder)
    tower, report = train_query_tower(tower_bundle.snapshot, *task, show_progress=False, **TOWER)
    return tower, report, before


def snapshot(encoder: Encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in encoder.model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def retrieval_ndcg(matcher: Matcher, tower: Encoder, pairs: pd.DataFrame) -> float:
    """Mean nDCG@10 of retrieving with ``tower`` over the queries with a positive title in the bundle."""
    rows = matcher.store.find_titles(pairs["title"].tolist())
    rel: dict[str, dict[str, int]] = {}
    for q, row, label in zip(pairs["query"], rows, pairs["label"], strict=True):
        if label > 0 and row is not None:
            rel.setdefault(q, {})[str(row)] = 1
    queries = list(rel)
    _, ids = matcher.index.search(tower.encode_queries(queries), 100)
    return float(np.mean([ndcg_at_k([str(r) for r in ids[i] if r >= 0], rel[q], 10) for i, q in enumerate(queries)]))


# -- the function API ------------------------------------------------------------------------------------


def test_a_tiny_tower_run(tower_run: Any, tower_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    tower, report, _ = tower_run
    train, valid = task
    assert report.metric == "ndcg@10"
    assert report.loss == "infonce+anchor"
    assert 0.0 <= report.baseline <= 1.0
    assert report.best_metric >= report.baseline
    assert report.best_metric == max([report.baseline] + [e["metric"] for e in report.epochs])
    assert 1 <= len(report.epochs) <= TOWER["epochs"]
    assert all(np.isfinite(e["loss"]) for e in report.epochs)
    assert report.valid_queries == valid["query"].nunique() == 16
    assert report.train_pairs == len(train)
    assert report.config["batch_size"] == 4
    # the returned tower is the best epoch's: its retrieval nDCG is the reported best
    assert retrieval_ndcg(tower_bundle, tower, valid) == pytest.approx(report.best_metric, abs=1e-9)
    assert retrieval_ndcg(tower_bundle, tower_bundle.encoder, valid) == pytest.approx(report.baseline, abs=1e-9)
    assert not tower.model.training


def test_the_tower_is_a_copy_and_the_title_encoder_is_untouched(
    tower_run: Any, tower_bundle: Matcher, tiny_encoder: Any
) -> None:
    tower, report, before = tower_run
    assert tower is not tiny_encoder
    assert tower.model is not tiny_encoder.model
    assert same_weights(snapshot(tiny_encoder), before)
    assert tower_bundle.query_encoder is tiny_encoder  # the function API does not install the tower
    assert all(p.requires_grad for p in tiny_encoder.model.parameters())
    if report.best_epoch > 0:
        assert tower.fingerprint != tiny_encoder.fingerprint
        assert not same_weights(snapshot(tower), before)
    else:
        assert tower.fingerprint == tiny_encoder.fingerprint


def test_no_better_epoch_keeps_the_original_weights(
    tower_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame], perfect_valid: pd.DataFrame, tiny_encoder: Any
) -> None:
    tower, report = train_query_tower(tower_bundle.snapshot, task[0], perfect_valid, show_progress=False, **TOWER)
    assert report.baseline == 1.0
    assert report.best_epoch == 0
    assert report.best_metric == 1.0
    assert same_weights(snapshot(tower), snapshot(tiny_encoder))
    assert tower.fingerprint == tiny_encoder.fingerprint
    queries = perfect_valid["query"].tolist()
    assert np.array_equal(tower.encode_queries(queries), tiny_encoder.encode_queries(queries))


def test_the_same_seed_gives_the_same_tower(tower_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    settings = {**TOWER, "epochs": 1}
    a, ra = train_query_tower(tower_bundle.snapshot, *task, show_progress=False, **settings)
    torch.manual_seed(999)
    b, rb = train_query_tower(tower_bundle.snapshot, *task, show_progress=False, **settings)
    assert same_weights(snapshot(a), snapshot(b))
    assert ra.epochs == rb.epochs


def test_training_only_the_top_layer(
    tower_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame], tiny_encoder: Any
) -> None:
    original = snapshot(tiny_encoder)
    tower, report = train_query_tower(tower_bundle.snapshot, *task, show_progress=False, train_layers=1, **TOWER)
    trained = snapshot(tower)
    top = [k for k in trained if k.startswith("encoder.layer.1.")]
    assert top
    for name, tensor in trained.items():
        if name not in top:
            assert torch.equal(tensor, original[name]), f"{name} changed although only the top layer trains"
    assert any(not torch.equal(trained[k], original[k]) for k in top) == (report.best_epoch > 0)


@pytest.mark.parametrize(
    "settings",
    [{"batch_size": 1}, {"epochs": 0}, {"lr": 0.0}, {"temperature": 0.0}, {"epoch": 1}],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_bad_tower_settings_are_config_errors(
    tower_bundle: Matcher, task: tuple[pd.DataFrame, pd.DataFrame], settings: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError):
        train_query_tower(tower_bundle.snapshot, *task, show_progress=False, **settings)
    with pytest.raises(ConfigError):
        TowerConfig.from_dict(settings)


def test_positives_must_be_in_the_bundle(tower_bundle: Matcher) -> None:
    unseen = pd.DataFrame(
        {"query": ["a", "b", "c"], "title": ["not a title", "nor this", TITLES[0]], "label": [1, 1, 0]}
    )
    with pytest.raises(SchemaError, match="titles are in the bundle"):
        train_query_tower(tower_bundle.snapshot, unseen, unseen, show_progress=False, **TOWER)


# -- saving and loading --------------------------------------------------------------------------------


def test_a_saved_tower_reloads(own_bundle: Matcher, tiny_encoder: Any, task: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    path = own_bundle.path
    assert path is not None
    vectors_file = current_generation(path) / "vectors.f32"
    vectors_before = vectors_file.read_bytes()
    in_memory_before = np.array(own_bundle.store.vectors)
    report = own_bundle.train_query_tower(*task, show_progress=False, **TOWER)

    gen = current_generation(path)
    manifest = read_manifest(gen, verify=True)
    assert QUERY_TOWER_FILE in manifest.files
    assert manifest.query_encoder is not None
    assert manifest.query_encoder["base"] == tiny_encoder.fingerprint
    assert manifest.query_encoder["report"]["best_epoch"] == report.best_epoch
    # the titles were not re-encoded: the vector file is the same, byte for byte
    assert (gen / "vectors.f32").read_bytes() == vectors_before
    assert np.array_equal(np.asarray(own_bundle.store.vectors), in_memory_before)

    with Matcher.load(path, encoder=tiny_encoder) as reloaded:
        tower = reloaded.query_encoder
        assert tower is not reloaded.encoder
        assert tower.fingerprint == manifest.query_encoder["fingerprint"]
        assert reloaded.encoder.fingerprint == tiny_encoder.fingerprint
        if report.best_epoch > 0:
            assert tower.fingerprint != reloaded.encoder.fingerprint
        else:
            assert same_weights(snapshot(tower), snapshot(tiny_encoder))
        assert np.array_equal(np.asarray(reloaded.store.vectors), in_memory_before)
        # queries go through the tower, titles (cached or not) through the title encoder
        queries = ["red running shoes", "black wireless headphones", "lamp"]
        titles = [TITLES[3], "a brand new title", TITLES[7]]
        q, t = reloaded.encode_pairs(queries, titles)
        assert np.array_equal(q, tower.encode_queries(queries))
        assert np.array_equal(q, own_bundle.query_encoder.encode_queries(queries))
        np.testing.assert_allclose(t, tiny_encoder.encode_titles(titles), atol=1e-5, rtol=0)
        for query in queries:
            hits = reloaded.search(query, k=5)
            expected = reloaded.search_vectors(tower.encode_queries([query]), 5)[0]
            assert [(h.id, h.score) for h in hits] == [(h.id, h.score) for h in expected]
            assert [(h.id, h.score) for h in hits] == [(h.id, h.score) for h in own_bundle.search(query, k=5)]
    assert same_weights(snapshot(tiny_encoder), snapshot(reloaded.encoder))


def test_a_saved_tower_that_did_not_improve_is_the_original(
    own_bundle: Matcher, tiny_encoder: Any, task: tuple[pd.DataFrame, pd.DataFrame], perfect_valid: pd.DataFrame
) -> None:
    report = own_bundle.train_query_tower(task[0], perfect_valid, show_progress=False, **TOWER)
    assert report.best_epoch == 0
    assert own_bundle.path is not None
    with Matcher.load(own_bundle.path, encoder=tiny_encoder) as reloaded:
        assert reloaded.manifest.query_encoder is not None
        assert reloaded.manifest.query_encoder["fingerprint"] == tiny_encoder.fingerprint
        assert reloaded.query_encoder.fingerprint == tiny_encoder.fingerprint
        assert same_weights(snapshot(reloaded.query_encoder), snapshot(tiny_encoder))


def test_save_false_installs_the_tower_in_memory_only(
    own_bundle: Matcher, tiny_encoder: Any, task: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    assert own_bundle.path is not None
    gen = current_generation(own_bundle.path)
    own_bundle.train_query_tower(*task, save=False, show_progress=False, **TOWER)
    assert own_bundle.query_encoder is not tiny_encoder
    assert own_bundle.encoder is tiny_encoder
    assert current_generation(own_bundle.path) == gen
    assert read_manifest(gen).query_encoder is None


def test_a_scorer_trained_after_the_tower_keeps_it(
    own_bundle: Matcher, tiny_encoder: Any, task: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    assert own_bundle.path is not None
    own_bundle.train_query_tower(*task, show_progress=False, **TOWER)
    record = own_bundle.manifest.query_encoder
    assert record is not None
    own_bundle.train_scorer(*task, epochs=2, show_progress=False)
    manifest = read_manifest(current_generation(own_bundle.path), verify=True)
    assert manifest.query_encoder == record
    assert {QUERY_TOWER_FILE, TRAIN_REPORT_FILE} <= set(manifest.files)
    with Matcher.load(own_bundle.path, encoder=tiny_encoder) as reloaded:
        assert reloaded.query_encoder.fingerprint == record["fingerprint"]
        queries, titles = task[1]["query"].tolist()[:20], task[1]["title"].tolist()[:20]
        assert np.array_equal(reloaded.score_pairs(queries, titles), own_bundle.score_pairs(queries, titles))


# -- the `train --query-tower` command -----------------------------------------------------------------------


def test_cli_train_with_a_query_tower(
    capsys: pytest.CaptureFixture[str],
    own_bundle: Matcher,
    tiny_model_dir: Path,
    tiny_encoder: Any,
    task: tuple[pd.DataFrame, pd.DataFrame],
    tmp_path: Path,
) -> None:
    pairs = tmp_path / "pairs.csv"
    task[0].to_csv(pairs, index=False)
    capsys.readouterr()
    argv = ["train", str(own_bundle.path), str(pairs), "--query-tower", "--epochs", "1", "--model", str(tiny_model_dir)]
    code = main([*argv, "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "query tower:" in out
    assert "scorer:" in out
    gen = current_generation(Path(str(own_bundle.path)))
    manifest = read_manifest(gen, verify=True)
    assert manifest.query_encoder is not None
    assert {QUERY_TOWER_FILE, TRAIN_REPORT_FILE} <= set(manifest.files)
    assert json.loads((gen / TRAIN_REPORT_FILE).read_text(encoding="utf-8"))["config"]["epochs"] == 1
    with Matcher.load(Path(str(own_bundle.path)), encoder=tiny_encoder) as reloaded:
        assert reloaded.query_encoder.fingerprint == manifest.query_encoder["fingerprint"]
