"""One training loop: only matching/training/loop.py steps an optimiser, every trainer goes through it, and one
negative miner with one rule (exact cosines, positives and near-positives left out)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import build_products

from matching.matcher import Matcher
from matching.training.mining import MARGIN, mine_negatives, positive_rows

TRAINING = Path(__file__).resolve().parent.parent / "matching" / "training"
LOOP = TRAINING / "loop.py"
TRAINERS = ("scorer.py", "tower.py", "finetune.py", "distill.py")
# calls that make an optimiser step of their own
STEP_CALLS = {"step", "backward", "zero_grad", "clip_grad_norm_", "clip_grad_value_"}


def _own_steps(path: Path) -> list[str]:
    """Where ``path`` steps an optimiser itself: a step/backward/clip call, or anything from ``torch.optim``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in STEP_CALLS:
            found.append(f"{path.name}:{node.lineno} .{node.func.attr}()")
        elif isinstance(node, ast.Attribute) and node.attr == "optim":
            found.append(f"{path.name}:{node.lineno} torch.optim")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.optim"):
            found.append(f"{path.name}:{node.lineno} from {node.module} import")
        elif isinstance(node, ast.Import) and any(a.name.startswith("torch.optim") for a in node.names):
            found.append(f"{path.name}:{node.lineno} import torch.optim")
    return found


def test_the_check_sees_an_optimiser_step() -> None:
    found = " ".join(_own_steps(LOOP))
    for call in (".step()", ".backward()", ".zero_grad()", ".clip_grad_norm_()", "torch.optim"):
        assert call in found


@pytest.mark.parametrize(
    "path", sorted(p for p in TRAINING.rglob("*.py") if p != LOOP), ids=lambda p: str(p.relative_to(TRAINING))
)
def test_no_trainer_steps_an_optimiser_of_its_own(path: Path) -> None:
    assert _own_steps(path) == [], "step through matching.training.loop.Optimisation"


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_uses_the_one_step(name: str) -> None:
    tree = ast.parse((TRAINING / name).read_text(encoding="utf-8"))
    calls = {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert "Optimisation" in names
    assert "update" in calls


@pytest.mark.parametrize("name", ["scorer.py", "tower.py", "finetune.py"])
def test_every_trainer_mines_with_the_one_miner(name: str) -> None:
    tree = ast.parse((TRAINING / name).read_text(encoding="utf-8"))
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert {"mine_negatives", "positive_rows"} <= names


# -- the one negative miner


@pytest.fixture(scope="module")
def mining_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> Any:
    matcher = build_products(tmp_path_factory.mktemp("mining") / "products", tiny_encoder)
    yield matcher
    matcher.close()


def _queries(matcher: Matcher) -> tuple[list[str], np.ndarray, list[set[int]]]:
    titles = matcher.catalogue()["title"].tolist()
    queries = [f"{t} spare part" for t in titles[:6]]
    rows = matcher.store.find_titles(titles[:6])
    positives = [{int(r)} for r in rows if r is not None]
    return queries, matcher.query_encoder.encode_queries(queries), positives


def test_positive_rows_keep_positive_titles_found_in_the_bundle(mining_bundle: Matcher) -> None:
    titles = mining_bundle.catalogue()["title"].tolist()
    pairs = pd.DataFrame(
        {
            "query": ["a", "a", "a", "b"],
            "title": [titles[0], titles[1], "no such title", titles[2]],
            "label": [1, 0, 1, 0],
        }
    )
    assert positive_rows(mining_bundle.snapshot, pairs) == {"a": mining_bundle.store.find_titles(titles[:1])}


def test_mining_keeps_the_nearest_titles_below_the_margin(mining_bundle: Matcher) -> None:
    snap = mining_bundle.snapshot
    _, vectors, positives = _queries(mining_bundle)
    mined = mine_negatives(snap, vectors, positives, count=5, depth=40, margin=MARGIN)
    stored = np.asarray(snap.store.vectors)
    for qv, rows, pos in zip(vectors, mined, positives, strict=True):
        assert 0 < len(rows) <= 5
        assert not set(rows) & pos
        exact = stored @ qv
        weakest = min(exact[r] for r in pos)
        assert all(exact[r] < weakest - MARGIN * abs(weakest) for r in rows)
        assert [exact[r] for r in rows] == sorted((exact[r] for r in rows), reverse=True)
        # nothing left out that passes the rule and scores higher than the last one kept
        allowed = [r for r in np.argsort(-exact, kind="stable") if r not in pos and exact[r] < weakest * (1 - MARGIN)]
        assert rows == [int(r) for r in allowed[:5]]


def test_mining_ignores_the_index_scores(mining_bundle: Matcher, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lossy index's distances are never used: the same ids with garbage scores mine the same negatives."""
    snap = mining_bundle.snapshot
    _, vectors, positives = _queries(mining_bundle)
    want = mine_negatives(snap, vectors, positives, count=5, depth=40)
    search = snap.index.search

    def lossy(queries: np.ndarray, k: int, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = search(queries, k, **kwargs)
        rng = np.random.default_rng(0)
        shuffled = np.stack([rng.permutation(row) for row in ids])
        return rng.random(scores.shape).astype(np.float32), shuffled

    monkeypatch.setattr(snap.index, "search", lossy)
    assert mine_negatives(snap, vectors, positives, count=5, depth=40) == want


def test_a_query_without_a_positive_in_the_bundle_mines_nothing(mining_bundle: Matcher) -> None:
    snap = mining_bundle.snapshot
    _, vectors, positives = _queries(mining_bundle)
    mined = mine_negatives(snap, vectors[:2], [set(), positives[1]], count=3, depth=40)
    assert mined[0] == []
    assert len(mined[1]) == 3
    assert mine_negatives(snap, vectors[:2], positives[:2], count=0, depth=40) == [[], []]


def test_no_margin_leaves_out_the_positives_only(mining_bundle: Matcher) -> None:
    snap = mining_bundle.snapshot
    _, vectors, positives = _queries(mining_bundle)
    mined = mine_negatives(snap, vectors, positives, count=5, depth=40, margin=None)
    stored = np.asarray(snap.store.vectors)
    for qv, rows, pos in zip(vectors, mined, positives, strict=True):
        nearest = [int(r) for r in np.argsort(-(stored @ qv), kind="stable") if int(r) not in pos]
        assert rows == nearest[:5]
