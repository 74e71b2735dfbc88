"""Fine-tuning the shared encoder: the loss each label shape gets, the metric moves and never ends worse, and the
bundle is re-encoded into one new generation that reloads from disk alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import COLOURS, build_products, make_catalogue, shifted_pairs

from matching import BundleError, ConfigError, Matcher, SchemaError
from matching.bundle import current_generation
from matching.cli import main
from matching.encoder import Encoder
from matching.layout import ENCODER_WEIGHTS
from matching.metrics import ndcg_at_k, spearman
from matching.training.finetune import FinetuneConfig, finetune_encoder, pick_loss
from matching.types import EncoderLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"lr": 3e-3, "epochs": 3, "batch_size": 8, "mix": 1.0}  # mix 1: the loop's own weights, unmixed


@pytest.fixture(scope="module")
def graded() -> tuple[pd.DataFrame, pd.DataFrame]:
    """0/1 pairs of the relabelled task: train on 4 colours, validate on 3 others."""
    return shifted_pairs(COLOURS[:4], all_titles=False), shifted_pairs(COLOURS[5:], all_titles=False)


@pytest.fixture(scope="module")
def positives(graded: tuple[pd.DataFrame, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    train, valid = graded
    return train[train["label"] > 0].reset_index(drop=True), valid[valid["label"] > 0].reset_index(drop=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Encoder) -> Any:
    """Read-only: the function API leaves the matcher alone."""
    m = build_products(tmp_path_factory.mktemp("ft") / "products", tiny_encoder)
    yield m
    m.close()


def weights(encoder: Encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in encoder.model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pool_ndcg(encoder: Encoder, valid: pd.DataFrame, titles: list[str]) -> float:
    """nDCG@10 over the catalogue's titles by brute force (the validation pool is the whole catalogue here)."""
    texts = list(dict.fromkeys(list(valid["title"]) + titles))
    rel: dict[str, dict[str, int]] = {}
    for q, t in zip(valid["query"], valid["title"], strict=True):
        rel.setdefault(q, {})[t] = 1
    q, t = encoder.encode(list(rel)), encoder.encode(texts)
    top = np.argsort(-(q @ t.T), axis=1)[:, :10]
    return float(np.mean([ndcg_at_k([texts[j] for j in top[i]], rel[k], 10) for i, k in enumerate(rel)]))


# -- the loss follows the labels


def test_the_loss_follows_the_labels() -> None:
    assert pick_loss(np.array([1.0, 1.0, 2.0]), EncoderLoss.AUTO)[0] is EncoderLoss.MNRL
    kind, why = pick_loss(np.array([0.0, 1.0, 1.0]), EncoderLoss.AUTO)
    assert kind is EncoderLoss.COSENT
    assert "0/1" in why
    kind, why = pick_loss(np.array([0.0, 2.5, 5.0, 1.2]), EncoderLoss.AUTO)
    assert kind is EncoderLoss.COSENT
    assert "graded labels (4 values)" in why
    assert pick_loss(np.array([0.0, 1.0]), EncoderLoss.MNRL) == (EncoderLoss.MNRL, "asked for")
    with pytest.raises(ConfigError, match="two different labels"):
        pick_loss(np.array([1.0, 1.0]), EncoderLoss.COSENT)
    with pytest.raises(ConfigError, match="no"):
        pick_loss(np.array([0.0, 0.0]), EncoderLoss.MNRL)


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": -1},
        {"batch_size": 1},
        {"lr": 0.0},
        {"evals_per_epoch": 0},
        {"valid_fraction": 1.0},
        {"mix": 0.0},
        {"mix": 1.5},
    ],
)
def test_bad_settings_are_config_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        FinetuneConfig.from_dict(bad)


def test_automatic_epochs_aim_at_a_minimum_of_steps() -> None:
    from matching.training.finetune import MIN_STEPS, epochs_for

    auto = FinetuneConfig()
    assert MIN_STEPS == 300
    assert epochs_for(auto, 360) == 2  # STS-B-sized: two passes
    assert epochs_for(auto, 52) == 6  # 312 steps
    assert epochs_for(auto, 3) == 10  # tiny sets stop at ten passes
    assert epochs_for(FinetuneConfig(epochs=1), 3) == 1  # asked for


def test_the_config_round_trips() -> None:
    cfg = FinetuneConfig(lr=5e-5, loss=EncoderLoss.COSENT, evals_per_epoch=3)
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["loss"] == "cosent"


# -- the metric moves, and never ends worse


def test_positives_only_moves_retrieval_and_the_report_is_the_encoders(
    bundle: Matcher, tiny_encoder: Encoder, positives: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    before = weights(tiny_encoder)
    tuned, report = finetune_encoder(bundle.snapshot, tiny_encoder, *positives, show_progress=False, **FAST)
    assert report.loss == "mnrl"
    assert report.metric == "ndcg@10"
    assert report.best_metric > report.baseline + 0.2  # the relabelled task is learnt (measured 0.09 -> 0.71)
    assert report.best_metric == max([report.baseline] + [e["metric"] for e in report.epochs])
    titles = make_catalogue()["title"].tolist()
    # the metric is brute-force nDCG over the catalogue, of the encoder returned
    assert pool_ndcg(tuned, positives[1], titles) == pytest.approx(report.best_metric, abs=1e-9)
    assert pool_ndcg(tiny_encoder, positives[1], titles) == pytest.approx(report.baseline, abs=1e-9)
    assert same(weights(tiny_encoder), before)  # a copy was trained
    assert not tuned.model.training


def test_graded_labels_move_spearman(bundle: Matcher, tiny_encoder: Encoder, graded: Any) -> None:
    tuned, report = finetune_encoder(None, tiny_encoder, *graded, show_progress=False, **FAST)
    assert report.loss == "cosent"
    assert report.metric == "spearman"
    assert report.best_metric > report.baseline
    valid = graded[1]
    q, t = tuned.encode(valid["query"].tolist()), tuned.encode(valid["title"].tolist())
    assert spearman(np.einsum("ij,ij->i", q, t), valid["label"].to_numpy()) == pytest.approx(report.best_metric)


@pytest.mark.parametrize("mix", [0.5, None])
def test_a_mix_interpolates_the_weights_and_is_validated(tiny_encoder: Encoder, graded: Any, mix: float | None) -> None:
    """mix=0.5 (and the default, 0.7) publishes (1 - mix) * start + mix * the weights mix=1 publishes (same seed),
    validated as it is."""
    share = FinetuneConfig().mix if mix is None else mix
    assert FinetuneConfig().mix == 0.7
    tuned, full = finetune_encoder(None, tiny_encoder, *graded, show_progress=False, **FAST)
    asked = {k: v for k, v in FAST.items() if k != "mix"} | ({} if mix is None else {"mix": mix})
    mixed, report = finetune_encoder(None, tiny_encoder, *graded, show_progress=False, **asked)
    start, end = weights(tiny_encoder), weights(tuned)
    for name, tensor in weights(mixed).items():
        if tensor.is_floating_point():
            assert torch.equal(tensor, (1.0 - share) * start[name] + share * end[name]), name
        else:
            assert torch.equal(tensor, start[name])
    assert report.compared == {"start": full.baseline, "tuned": full.best_metric, f"mix {share:g}": report.best_metric}
    assert report.chosen == f"mix {share:g}"
    assert (full.compared, full.chosen) == ({}, "")  # mix=1: the fine-tuned weights, nothing mixed
    valid = graded[1]
    q, t = mixed.encode(valid["query"].tolist()), mixed.encode(valid["title"].tolist())
    assert spearman(np.einsum("ij,ij->i", q, t), valid["label"].to_numpy()) == pytest.approx(report.best_metric)
    assert report.best_metric > report.baseline
    assert report.best_epoch == full.best_epoch
    assert mixed.tuned


def test_a_mix_no_better_than_the_start_keeps_the_start(tiny_encoder: Encoder, graded: Any) -> None:
    """Where the mixture does not beat the starting weights on validation, those are kept and the report says so:
    epoch 0, the baseline as the best figure (a search over trials compares those), ``chosen`` "start"."""
    from matching.training.finetune import _mix

    tuned, report = finetune_encoder(None, tiny_encoder, *graded, show_progress=False, **FAST)
    assert report.best_epoch > 0
    _mix(tuned, tiny_encoder, 0.5, lambda _: report.baseline, report)
    assert same(weights(tuned), weights(tiny_encoder))
    assert (report.best_epoch, report.best_metric, report.chosen) == (0, report.baseline, "start")
    assert "chosen: start" in report.table()


def easy_valid() -> pd.DataFrame:
    """Each title against itself (label 1) and against the title half the catalogue away (label 0): the
    untouched encoder already orders these almost perfectly."""
    titles = make_catalogue()["title"].tolist()
    half = len(titles) // 2
    rows = [(t, t, 1) for t in titles[::4]] + [
        (t, titles[(i + half) % len(titles)], 0) for i, t in enumerate(titles[::4])
    ]
    return pd.DataFrame(rows, columns=["query", "title", "label"])


def test_no_better_validation_returns_the_starting_weights(tiny_encoder: Encoder, graded: Any) -> None:
    # a learning rate far too high wrecks every check: the starting weights come back, bit for bit
    tuned, report = finetune_encoder(
        None, tiny_encoder, graded[0], easy_valid(), show_progress=False, lr=5.0, epochs=1, batch_size=8, patience=1
    )
    assert report.baseline > 0.8
    assert report.best_epoch == 0
    assert report.best_metric == report.baseline
    assert all(not e["metric"] >= report.baseline for e in report.epochs)  # lower, or NaN
    assert same(weights(tuned), weights(tiny_encoder))


def test_the_same_seed_gives_the_same_encoder(bundle: Matcher, tiny_encoder: Encoder, positives: Any) -> None:
    settings = {**FAST, "epochs": 1, "mixed_precision": False}
    a, ra = finetune_encoder(bundle.snapshot, tiny_encoder, *positives, show_progress=False, **settings)
    b, rb = finetune_encoder(bundle.snapshot, tiny_encoder, *positives, show_progress=False, **settings)
    assert same(weights(a), weights(b))
    assert ra.epochs == rb.epochs


def test_bad_pairs_are_schema_errors(tiny_encoder: Encoder, graded: Any) -> None:
    train, valid = graded
    with pytest.raises(SchemaError, match="one label"):
        finetune_encoder(None, tiny_encoder, train, valid.assign(label=1.0), show_progress=False)
    with pytest.raises(SchemaError, match="no column"):
        finetune_encoder(None, tiny_encoder, train.rename(columns={"label": "y"}), valid, show_progress=False)


# -- the bundle


def test_finetune_publishes_one_generation_that_reloads(
    tmp_path: Path, tiny_encoder: Encoder, positives: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    m = build_products(tmp_path / "b", tiny_encoder)
    before = m.catalogue()
    pinned = m.pin()
    pinned_hits = [(h.id, h.score) for h in pinned.search("red lamp", 5)]
    report = m.finetune(*positives, show_progress=False, retrain_scorer=False, **FAST)
    assert report.best_epoch > 0
    assert report.scorer_report is None
    pd.testing.assert_frame_equal(m.catalogue(), before)  # ids, titles, metadata identical
    entry = m.manifest.encoder
    assert entry["weights"] == ENCODER_WEIGHTS
    assert entry["fingerprint"] != tiny_encoder.fingerprint
    assert entry["source"] == tiny_encoder.source  # the architecture still comes from the base checkpoint
    record = m.manifest.source["reencoded"]
    assert record["from_fingerprint"] == tiny_encoder.fingerprint
    assert record["finetuned"]["best_metric"] == report.best_metric
    assert record["scorer"].startswith("reset")
    live = m.store.live_ids()
    np.testing.assert_allclose(m.store.vectors[live], m.encoder.encode_titles(before["title"].tolist()), atol=1e-5)
    assert [(h.id, h.score) for h in pinned.search("red lamp", 5)] == pinned_hits  # the old generation, unchanged
    m.add(pd.DataFrame({"id": [1], "title": ["acme violet lamp"]}), show_progress=False)
    added = m.store.vectors[m.store.lookup(["1"])["1"].row_id]
    hits = [(h.id, h.score) for h in m.search("red lamp", 5)]
    m.close()
    pinned.close()
    with Matcher.load(tmp_path / "b") as again:  # from disk alone: base checkpoint + the bundle's weights
        assert again.encoder.fingerprint == entry["fingerprint"]
        np.testing.assert_allclose(again.encoder.encode_titles(["acme violet lamp"])[0], added, atol=1e-5)
        assert [(h.id, h.score) for h in again.search("red lamp", 5)] == hits
    with pytest.raises(BundleError, match="fine-tuned"):  # its weights are in the bundle, not in tiny_encoder
        Matcher.load(tmp_path / "b", encoder=tiny_encoder)


def test_finetune_that_does_not_improve_publishes_nothing(tmp_path: Path, tiny_encoder: Encoder, graded: Any) -> None:
    m = build_products(tmp_path / "b", tiny_encoder)
    gen = current_generation(tmp_path / "b").name
    report = m.finetune(graded[0], easy_valid(), show_progress=False, lr=5.0, epochs=1, batch_size=8, patience=1)
    assert report.best_epoch == 0
    assert current_generation(tmp_path / "b").name == gen
    assert m.encoder is tiny_encoder
    m.close()


def test_a_bad_reranker_setting_fails_before_the_fine_tune(
    tmp_path: Path, tiny_encoder: Encoder, positives: Any
) -> None:
    m = build_products(tmp_path / "b", tiny_encoder)
    gen = current_generation(tmp_path / "b").name
    for bad in (2.0, True, "0.5"):
        with pytest.raises(ConfigError, match="residual_share"):
            m.finetune(*positives, show_progress=False, residual_share=bad, **FAST)
    assert current_generation(tmp_path / "b").name == gen
    assert m.encoder is tiny_encoder  # refused before any training
    m.close()


def test_search_runs_trials_and_keeps_the_best(tmp_path: Path, tiny_encoder: Encoder, positives: Any) -> None:
    m = build_products(tmp_path / "b", tiny_encoder)
    space = {"lr": [3e-3, 1e-7]}
    from matching.training.finetune import search_finetune

    _tuned, report, found = search_finetune(
        m.snapshot, tiny_encoder, *positives, trials=2, space=space, show_progress=False, epochs=2, batch_size=8
    )
    assert len(found.trials) == 2
    assert found.best["settings"]["lr"] == 3e-3
    assert report.best_metric == max(t["best_metric"] for t in found.trials)
    m.close()


def test_the_cli_finetunes_a_bundle(
    tmp_path: Path, tiny_encoder: Encoder, positives: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    build_products(tmp_path / "b", tiny_encoder).close()
    train, valid = positives
    train.to_csv(tmp_path / "train.csv", index=False)
    valid.to_csv(tmp_path / "valid.csv", index=False)
    args = ["finetune", str(tmp_path / "b"), str(tmp_path / "train.csv"), "--valid", str(tmp_path / "valid.csv")]
    settings = ["--epochs", "3", "--lr", "3e-3", "--batch-size", "8", "--residual-share", "0.75", "--quiet"]
    assert main([*args, *settings]) == 0
    out = capsys.readouterr().out
    assert "ndcg@10" in out
    assert "re-encoded" in out
    with Matcher.load(tmp_path / "b") as m:
        assert m.manifest.encoder["weights"] == ENCODER_WEIGHTS
        assert m.manifest.source["reencoded"]["finetuned"]["loss"] == "mnrl"
        assert m.scorer.trained  # retrained on the same pairs after the re-encode (it was reset by it)
        retrained = m.manifest.source["reencoded"]["finetuned"]["scorer_report"]
        assert retrained["config"]["residual_share"] == 0.75  # --residual-share reaches the reranker's training
    assert "the reranker was retrained on the same pairs" in out


@pytest.fixture
def tuned_bundle(tmp_path: Path, tiny_encoder: Encoder, positives: Any) -> Any:
    """A bundle fine-tuned once (reranker left reset), at tmp_path / "b"."""
    m = build_products(tmp_path / "b", tiny_encoder)
    report = m.finetune(*positives, show_progress=False, retrain_scorer=False, **FAST)
    assert report.best_epoch > 0
    yield m
    m.close()


def test_a_reader_refreshes_onto_a_bundle_finetuned_elsewhere(
    tmp_path: Path, tiny_encoder: Encoder, positives: Any
) -> None:
    build_products(tmp_path / "b", tiny_encoder).close()
    with Matcher.load(tmp_path / "b") as reader, Matcher.load(tmp_path / "b") as writer:
        writer.finetune(*positives, show_progress=False, retrain_scorer=False, **FAST)
        assert reader.refresh()  # no fingerprint error: the new encoder comes from the bundle
        assert reader.encoder.fingerprint == writer.encoder.fingerprint != tiny_encoder.fingerprint
        hits = [(h.id, round(h.score, 6)) for h in writer.search("red lamp", 5)]
        assert [(h.id, round(h.score, 6)) for h in reader.search("red lamp", 5)] == hits
        reader.add(pd.DataFrame({"id": [2], "title": ["acme violet lamp"]}), show_progress=False)  # writes work too
        np.testing.assert_allclose(
            reader.store.vectors[reader.store.lookup(["2"])["2"].row_id],
            writer.encoder.encode_titles(["acme violet lamp"])[0],
            atol=1e-5,
        )


def test_changes_carry_the_weights_without_hashing_them_again(tuned_bundle: Matcher, tmp_path: Path) -> None:
    digest = tuned_bundle.manifest.files[ENCODER_WEIGHTS]
    tuned_bundle.add(pd.DataFrame({"id": [3], "title": ["acme teal kettle"]}), show_progress=False)
    tuned_bundle.compact(show_progress=False)
    assert tuned_bundle.manifest.files[ENCODER_WEIGHTS] == digest
    with Matcher.load(tmp_path / "b", verify=True) as again:  # every checksum read back and checked
        assert again.encoder.fingerprint == tuned_bundle.encoder.fingerprint
    gen = current_generation(tmp_path / "b")
    raw = bytearray((gen / ENCODER_WEIGHTS).read_bytes())
    raw[-1] ^= 0xFF
    (gen / ENCODER_WEIGHTS).unlink()  # a new file: the older generations keep their own link
    (gen / ENCODER_WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(BundleError):
        Matcher.load(tmp_path / "b", verify=True)


def test_a_copy_of_a_pinned_view_keeps_the_weights(tuned_bundle: Matcher, tmp_path: Path) -> None:
    pinned = tuned_bundle.pin()
    pinned.copy(tmp_path / "copy", show_progress=False).close()
    with Matcher.load(tmp_path / "copy", verify=True) as copy:
        assert copy.encoder.fingerprint == tuned_bundle.encoder.fingerprint


def test_reencode_keeps_a_tuned_encoder_and_its_weights(
    tuned_bundle: Matcher, tmp_path: Path, tiny_encoder: Encoder, positives: Any
) -> None:
    fingerprint = tuned_bundle.encoder.fingerprint
    tuned_bundle.reencode(preset="exact", show_progress=False)  # no model: the bundle's own encoder
    assert tuned_bundle.manifest.encoder["fingerprint"] == fingerprint
    # an encoder tuned outside any bundle, then given to another bundle: its weights go with it
    other, report = finetune_encoder(None, tiny_encoder, *positives, show_progress=False, **FAST)
    assert other.tuned
    assert report.best_epoch > 0
    m = build_products(tmp_path / "other", tiny_encoder)
    m.reencode(encoder=other, show_progress=False)
    m.close()
    with Matcher.load(tmp_path / "other", verify=True) as again:
        assert again.encoder.fingerprint == other.fingerprint
        assert again.manifest.encoder["weights"] == ENCODER_WEIGHTS
