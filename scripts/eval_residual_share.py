"""How the reranker's published residual share was chosen (issue #20): each trained scorer scored at several shares.

    .venv/bin/python scripts/eval_residual_share.py [--json results/eval_residual_share.json]

Reads the bundles the eval scripts leave in indexes/ (run them first; a missing one is skipped with a note):
bench-lcqmc, bench-sts, bench-mrpc, bench-scifact (scripts/eval_hybrid.py), bench-ft-sts and bench-ft-scifact
(scripts/eval_finetune.py: fine-tuned encoders with their vectors), bench-ml-finetune (scripts/eval_multilingual.py
--only finetune). On each, `train_scorer` trains as `matching train` does (default settings, the learned form kept
even where it does not beat the default) with the full residual; the kept form is then scored on the set's test
pairs (SciFact: nDCG@10 of the reranked hybrid retrieval) with its residual at each share (0: the untrained default,
1: all of it). The STS-B captions are also scored by a scorer trained on the other genres only. Prints a table (each
figure and its change against the untrained one) and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets as ds

from matching import Matcher
from matching.evaluate import evaluate, load_qrels, load_queries
from matching.metrics import roc_auc, spearman
from matching.scorer import Scorer
from matching.training.scorer import shared_residual, train_scorer

OUT = Path("indexes")
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
Metric = Callable[[np.ndarray, np.ndarray], float]


def rho(y: np.ndarray, s: np.ndarray) -> float:
    return spearman(s, y)


def at_shares(scorer: Scorer, figure: Callable[[Scorer], float]) -> dict[str, float]:
    return {f"{s:g}": figure(shared_residual(copy.deepcopy(scorer), s).eval()) for s in SHARES}


def pair_metric(metric: Metric, y: np.ndarray, q: np.ndarray, t: np.ndarray, lex: np.ndarray, s: Scorer) -> float:
    return metric(y, s.score(q, t, lex))


def pair_rows(
    bundle: str, train: pd.DataFrame, valid: pd.DataFrame | None, tests: dict[str, pd.DataFrame], metric: Metric
) -> dict[str, Any]:
    """Train on ``train`` in ``bundle`` and score each test set at every share."""
    with Matcher.load(OUT / bundle, verify=False) as m:
        snap = m.snapshot
        scorer, report = train_scorer(snap, train, valid, residual_share=1.0, require_win=False, show_progress=False)
        out: dict[str, Any] = {}
        for name, frame in tests.items():
            queries, titles = frame["query"].tolist(), frame["title"].tolist()
            q, t = snap.encode_pairs(queries, titles)
            y = frame["label"].to_numpy()
            figure = functools.partial(pair_metric, metric, y, q, t, snap.lexical_features(queries, titles))
            out[name] = {"form": report.chosen, **at_shares(scorer, figure)}
        return out


def scifact_row(bundle: str) -> dict[str, Any]:
    base = ds.require("beir_scifact")
    queries, qrels = load_queries(base / "queries.jsonl"), load_qrels(base / "qrels" / "test.tsv")
    with Matcher.load(OUT / bundle, verify=False) as m:
        positives = ds.scifact_pairs("train").assign(label=1)
        scorer, report = train_scorer(m.snapshot, positives, residual_share=1.0, require_win=False, show_progress=False)

        def ndcg(s: Scorer) -> float:
            m.scorer = s
            return float(evaluate(m, queries, qrels).reranked["ndcg@10"])

        return {"form": report.chosen, **at_shares(scorer, ndcg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="results/eval_residual_share.json")
    args = parser.parse_args()
    sts = {s: ds.sts(s, genre=True) for s in ("train", "dev", "test")}
    captions = sts["test"][sts["test"]["genre"] == "main-captions"].drop(columns="genre")
    plain = {s: f.drop(columns="genre") for s, f in sts.items()}
    other = {s: f[f["genre"] != "main-captions"].drop(columns="genre") for s, f in sts.items()}
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "bench-lcqmc": lambda: pair_rows(
            "bench-lcqmc", ds.lcqmc("dev"), None, {"LCQMC test (trained on dev)": ds.lcqmc("test")}, roc_auc
        ),
        "bench-sts": lambda: {
            **pair_rows("bench-sts", plain["train"], plain["dev"], {"STS-B test": plain["test"]}, rho),
            **pair_rows(
                "bench-sts", other["train"], other["dev"], {"STS-B captions (trained on other genres)": captions}, rho
            ),
        },
        "bench-mrpc": lambda: pair_rows(
            "bench-mrpc", ds.mrpc("train"), ds.mrpc("val"), {"MRPC test": ds.mrpc("test")}, roc_auc
        ),
        "bench-scifact": lambda: {"SciFact nDCG@10": scifact_row("bench-scifact")},
        "bench-ft-sts": lambda: pair_rows(
            "bench-ft-sts", plain["train"], plain["dev"], {"STS-B test, fine-tuned encoder": plain["test"]}, rho
        ),
        "bench-ft-scifact": lambda: {"SciFact nDCG@10, fine-tuned encoder": scifact_row("bench-ft-scifact")},
        "bench-ml-finetune": lambda: pair_rows(
            "bench-ml-finetune",
            ds.lcqmc("dev"),
            None,
            {"LCQMC test, multilingual-e5-small fine-tuned on dev": ds.lcqmc("test")},
            roc_auc,
        ),
    }
    rows: dict[str, Any] = {}
    for bundle, run in runs.items():
        if not (OUT / bundle).is_dir():
            print(f"skipped: {OUT / bundle} is missing (run the eval script that builds it)")
            continue
        rows.update(run())
    header = f"{'set':<54} {'form':<7}" + "".join(f"{'share ' + f'{s:g}':>16}" for s in SHARES)
    print(header)
    gains: dict[str, list[float]] = {f"{s:g}": [] for s in SHARES}
    for name, row in rows.items():
        cells = []
        for s in SHARES:
            key = f"{s:g}"
            gain = 100 * (row[key] - row["0"])
            gains[key].append(gain)
            cells.append(f"{row[key]:.4f} ({gain:+.1f})" if s else f"{row[key]:.4f}")
        print(f"{name:<54} {row['form']:<7}" + "".join(f"{c:>16}" for c in cells))
    summary = {k: {"mean_gain": float(np.mean(v)), "worst_gain": float(np.min(v))} for k, v in gains.items() if v}
    print(
        "mean / worst change in points: "
        + ", ".join(f"{k}: {v['mean_gain']:+.2f} / {v['worst_gain']:+.2f}" for k, v in summary.items())
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"sets": rows, "summary": summary}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
