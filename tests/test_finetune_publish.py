"""A fine-tune publishes one generation: the tuned encoder, its vectors and index, and the reranker retrained on
them. A writer killed at any moment of it leaves the bundle exactly before or exactly after; another writer
publishing meanwhile makes it refuse, leaving that writer's state."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import COLOURS, build_products, hidden_entries, shifted_pairs

import matching.training.finetune as finetune_module
import matching.training.scorer as scorer_module
from matching import BundleError, Matcher
from matching.bundle import current_generation
from matching.encoder import Encoder
from matching.layout import SCORER_CONFIG, SCORER_WEIGHTS, TRAIN_REPORT
from matching.scorer import Scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"lr": 3e-3, "epochs": 3, "batch_size": 8}
QUERIES = ["red lamp", "acme kettle", "a blue mug", "green"]


@pytest.fixture(scope="module")
def positives() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Positive pairs of the relabelled task: train on 4 colours, validate on 3 others."""
    train, valid = shifted_pairs(COLOURS[:4], all_titles=False), shifted_pairs(COLOURS[5:], all_titles=False)
    return train[train["label"] > 0].reset_index(drop=True), valid[valid["label"] > 0].reset_index(drop=True)


def generations(bundle: Path) -> list[str]:
    return sorted(p.name for p in bundle.iterdir() if p.name.startswith("gen-"))


def hits(m: Matcher) -> list[list[tuple[str, float]]]:
    return [[(str(h.id), round(h.score, 6)) for h in found] for found in m.search_batch(QUERIES, k=5)]


def weights(scorer: Scorer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in scorer.state_dict().items()}


def test_finetune_publishes_encoder_and_retrained_reranker_as_one_generation(
    tmp_path: Path, tiny_encoder: Encoder, positives: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[tuple[Scorer, Any]] = []
    real = scorer_module.train_scorer

    def recording(*args: Any, **kwargs: Any) -> Any:
        trained.append(real(*args, **kwargs))
        return trained[-1]

    monkeypatch.setattr(scorer_module, "train_scorer", recording)
    m = build_products(tmp_path / "b", tiny_encoder)
    before = generations(tmp_path / "b")
    report = m.finetune(*positives, show_progress=False, **FAST)
    assert report.best_epoch > 0
    assert len(trained) == 1  # once, on the staged generation
    scorer, scorer_report = trained[0]
    after = generations(tmp_path / "b")
    assert len(after) == len(before) + 1  # one generation, not two
    assert current_generation(tmp_path / "b").name == m.generation == after[-1] == "gen-000002"
    record = m.manifest.source["reencoded"]
    assert record["from_fingerprint"] == tiny_encoder.fingerprint
    assert m.manifest.encoder["fingerprint"] == m.encoder.fingerprint != tiny_encoder.fingerprint
    assert record["finetuned"]["best_metric"] == report.best_metric
    assert report.scorer_report == scorer_report.to_dict() == record["finetuned"]["scorer_report"]
    assert scorer_report.chosen != "default"  # measured: a learned form wins on these pairs
    assert record["scorer"].startswith(f"retrained: {scorer_report.chosen} (held-out ndcg@10: default ")
    assert json.loads((tmp_path / "b" / m.generation / TRAIN_REPORT).read_text()) == scorer_report.to_dict()
    assert {TRAIN_REPORT, SCORER_WEIGHTS, SCORER_CONFIG} <= m.manifest.files.keys()
    m.close()
    with Matcher.load(tmp_path / "b", verify=True) as again:  # checksums cover the retrained reranker
        assert again.scorer.config == scorer.config
        assert weights(again.scorer).keys() == weights(scorer).keys()
        assert all(torch.equal(v, weights(scorer)[k]) for k, v in weights(again.scorer).items())
        titles = again.catalogue()["title"].tolist()[:8]
        q, t = again.encoder.encode(QUERIES * 2), again.encoder.encode_titles(titles)
        lex = again.snapshot.lexical_features(QUERIES * 2, titles)
        np.testing.assert_array_equal(again.scorer.score(q, t, lex), scorer.score(q, t, lex))


def test_a_reranker_that_wins_nothing_stays_reset_and_the_manifest_says_so(
    tmp_path: Path, tiny_encoder: Encoder, positives: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = scorer_module.train_scorer

    def default_wins(*args: Any, **kwargs: Any) -> Any:
        scorer, report = real(*args, **kwargs)
        report.chosen = "default"
        return scorer, report

    monkeypatch.setattr(scorer_module, "train_scorer", default_wins)
    m = build_products(tmp_path / "b", tiny_encoder)
    reset = m.scorer.config
    report = m.finetune(*positives, show_progress=False, **FAST)
    assert generations(tmp_path / "b") == ["gen-000001", "gen-000002"]
    assert report.scorer_report is not None
    assert report.scorer_report["chosen"] == "default"
    record = m.manifest.source["reencoded"]
    assert record["scorer"].startswith("reset: retrained, but no learned form beat the untrained default")
    assert record["finetuned"]["scorer_report"] == report.scorer_report
    assert TRAIN_REPORT not in m.manifest.files
    assert not m.scorer.trained
    assert m.scorer.config == reset
    m.close()


def test_a_failed_retrain_publishes_nothing(
    tmp_path: Path, tiny_encoder: Encoder, positives: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(scorer_module, "train_scorer", fails)
    m = build_products(tmp_path / "b", tiny_encoder)
    found = hits(m)
    with pytest.raises(RuntimeError, match="out of memory"):
        m.finetune(*positives, show_progress=False, **FAST)
    assert generations(tmp_path / "b") == ["gen-000001"]
    assert hidden_entries(tmp_path / "b") == []  # the staged generation is gone too
    assert m.encoder is tiny_encoder
    m.close()
    with Matcher.load(tmp_path / "b", verify=True) as again:
        assert again.manifest.encoder["fingerprint"] == tiny_encoder.fingerprint
        assert hits(again) == found


def test_finetune_is_refused_when_another_writer_published_meanwhile(
    tmp_path: Path, tiny_encoder: Encoder, positives: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_products(tmp_path / "b", tiny_encoder).close()
    a, b = Matcher.load(tmp_path / "b"), Matcher.load(tmp_path / "b")
    real = finetune_module.finetune_encoder

    def with_a_writer_meanwhile(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        b.add(pd.DataFrame({"id": [7], "title": ["acme teal kettle"]}), show_progress=False)
        return out

    monkeypatch.setattr(finetune_module, "finetune_encoder", with_a_writer_meanwhile)
    with pytest.raises(BundleError, match="changed since"):
        a.finetune(*positives, show_progress=False, **FAST)
    assert generations(tmp_path / "b") == ["gen-000001", "gen-000002"]
    assert current_generation(tmp_path / "b").name == b.generation == "gen-000002"
    assert hidden_entries(tmp_path / "b") == []
    expected = hits(b)
    a.close()
    b.close()
    with Matcher.load(tmp_path / "b", verify=True) as again:  # exactly the other writer's state
        assert again.manifest.encoder["fingerprint"] == tiny_encoder.fingerprint
        assert "reencoded" not in again.manifest.source
        assert len(again) == 41
        assert hits(again) == expected


# -- killed


KILLER = """
import sys, time
import pandas as pd
import torch
torch.set_num_threads(1)
import matching.bundle, matching.generation
import matching.training.scorer as trainer
from matching import Matcher

bundle, train, valid, phase = sys.argv[1:5]

def pause(what):
    print(what, flush=True)
    time.sleep(300)  # until killed

def stop_at(module, name, said):
    real = getattr(module, name)
    def stopped(*args, **kwargs):
        pause(said)
        return real(*args, **kwargs)
    setattr(module, name, stopped)

if phase == "index":  # the new vectors are stored, the index not yet built
    stop_at(matching.generation, "index_from_store", "paused")
elif phase == "scorer":  # the staged generation is complete with the reset reranker, now trained again
    stop_at(trainer, "train_scorer", "paused")
elif phase == "swap":  # everything written and renamed into place; CURRENT not yet swapped
    stop_at(matching.bundle, "_point", "paused")
with Matcher.load(bundle, verify=False) as m:
    print("begin", flush=True)
    m.finetune(pd.read_csv(train), pd.read_csv(valid), show_progress=False, lr=3e-3, epochs=3, batch_size=8)
pause("end")
"""


def killer(tmp_path: Path, positives: Any, phase: str) -> subprocess.Popen[str]:
    """Start the fine-tuning writer on tmp_path / "b"; it stops (and waits to be killed) at ``phase``."""
    positives[0].to_csv(tmp_path / "train.csv", index=False)
    positives[1].to_csv(tmp_path / "valid.csv", index=False)
    (tmp_path / "killer.py").write_text(KILLER, encoding="utf-8")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    args = [str(tmp_path / "b"), str(tmp_path / "train.csv"), str(tmp_path / "valid.csv"), phase]
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "killer.py"), *args], stdout=subprocess.PIPE, text=True, cwd=root, env=env
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "begin"
    return proc


def before_or_after(bundle: Path, manifest: dict[str, Any], found: Any, encoder: Encoder) -> str:
    """Load the bundle (every checksum checked): "before" if it is exactly as it was (the same generation, manifest
    and results), "after" if it is the fine-tuned one (the tuned encoder, its vectors and the retrained reranker,
    in one new generation); anything else fails. The next write clears what a killed writer left."""
    with Matcher.load(bundle, verify=True) as again:
        if again.generation == "gen-000001":
            assert again.manifest.to_dict() == manifest
            assert hits(again) == found
            state = "before"
        else:
            assert again.generation == "gen-000002"
            assert again.manifest.encoder["fingerprint"] != encoder.fingerprint
            assert again.manifest.source["reencoded"]["scorer"].startswith("retrained: ")
            assert again.scorer.trained
            assert TRAIN_REPORT in again.manifest.files
            live = again.store.live_ids()
            titles = again.catalogue()["title"].tolist()
            np.testing.assert_allclose(again.store.vectors[live], again.encoder.encode_titles(titles), atol=1e-5)
            state = "after"
        again.add(pd.DataFrame({"id": [7], "title": ["acme teal kettle"]}), show_progress=False)
    assert hidden_entries(bundle) == []
    return state


@pytest.mark.parametrize("phase", ["index", "scorer", "swap", "after"])
def test_a_finetune_killed_leaves_exactly_before_or_after(
    tmp_path: Path, tiny_encoder: Encoder, positives: Any, phase: str
) -> None:
    m = build_products(tmp_path / "b", tiny_encoder)
    manifest, found = m.manifest.to_dict(), hits(m)
    m.close()
    proc = killer(tmp_path, positives, phase)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == ("end" if phase == "after" else "paused")
    finally:
        proc.kill()
        proc.wait(timeout=60)
    expected = "after" if phase == "after" else "before"
    assert before_or_after(tmp_path / "b", manifest, found, tiny_encoder) == expected
    if phase == "after":
        assert len(generations(tmp_path / "b")) <= 3  # gen-000002 and the add's; no reset-reranker generation


def test_a_finetune_killed_at_random_moments_leaves_exactly_before_or_after(
    tmp_path: Path, tiny_encoder: Encoder, positives: Any
) -> None:
    rng = random.Random(22)
    duration, outcomes = 0.0, []
    for attempt in range(5):
        shutil.rmtree(tmp_path / "b", ignore_errors=True)
        m = build_products(tmp_path / "b", tiny_encoder)
        manifest, found = m.manifest.to_dict(), hits(m)
        m.close()
        proc = killer(tmp_path, positives, "none")
        started = time.perf_counter()
        try:
            assert proc.stdout is not None
            if attempt == 0:  # the first runs to the end: how long a fine-tune takes here
                assert proc.stdout.readline().strip() == "end"
                duration = time.perf_counter() - started
            else:
                time.sleep(rng.uniform(0, duration))
        finally:
            proc.kill()
            proc.wait(timeout=60)
        outcomes.append(before_or_after(tmp_path / "b", manifest, found, tiny_encoder))
    assert outcomes[0] == "after"
    assert "before" in outcomes[1:], outcomes  # kills landed mid-fine-tune (the publish is its last instant)
    print(f"\nfine-tune kills: {outcomes[1:]} (a fine-tune takes {duration:.1f} s here)")


def test_a_reranker_trained_after_a_reset_finetune_is_what_the_manifest_says(
    tmp_path: Path, tiny_encoder: Encoder, positives: Any
) -> None:
    m = build_products(tmp_path / "b", tiny_encoder)
    m.finetune(*positives, show_progress=False, retrain_scorer=False, **FAST)
    assert m.manifest.source["reencoded"]["scorer"].startswith("reset: ")
    fingerprint = m.manifest.source["reencoded"]["from_fingerprint"]
    report = m.train_scorer(*positives, show_progress=False, epochs=1, batch_size=8, require_win=False)
    record = m.manifest.source["reencoded"]
    assert record["scorer"] == f"retrained after the re-encode: {report.chosen}"
    assert record["from_fingerprint"] == fingerprint  # the rest of the record stays
    assert m.scorer.trained
    m.close()
