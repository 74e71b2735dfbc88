"""What `train` publishes from a few hundred labelled pairs (issue #20): the form chosen and its test figure.

    .venv/bin/python scripts/eval_few_pairs.py [--sizes 100 300 1000] [--json results/eval_few_pairs.json]

Reads the bundles scripts/eval_hybrid.py leaves in indexes/ (bench-sts, bench-mrpc, bench-lcqmc; run it first). For
each set and size, three random samples of that many training pairs (STS-B train, MRPC train, LCQMC dev) are
trained on as `matching train` does (default settings: a tenth of the sample's queries held out for validation, the
linear and the MLP residual compared with the untrained default and each other, a form published only when it wins
beyond chance), and the published scorer is scored on the set's test pairs against the untrained default. Beside it,
the MLP published whatever validation says (``form="mlp", require_win=False``): what a trainer without the rule
would have given. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets as ds

from matching import Matcher
from matching.metrics import roc_auc, spearman
from matching.scorer import Scorer
from matching.search import Snapshot
from matching.training.scorer import train_scorer
from matching.types import ScorerForm

OUT = Path("indexes")
SEEDS = (0, 1, 2)
Metric = Callable[[np.ndarray, np.ndarray], float]


def rho(y: np.ndarray, s: np.ndarray) -> float:
    return spearman(s, y)


def one_set(bundle: str, train: pd.DataFrame, test: pd.DataFrame, metric: Metric, sizes: list[int]) -> dict[str, Any]:
    """Per size and sample: the form published and its test figure, and the MLP's without the rule."""
    with Matcher.load(OUT / bundle, verify=False) as m:
        snap: Snapshot = m.snapshot
        queries, titles = test["query"].tolist(), test["title"].tolist()
        q, t = snap.encode_pairs(queries, titles)
        lex = snap.lexical_features(queries, titles)
        y = test["label"].to_numpy()
        untrained = Scorer(dataclasses.replace(snap.scorer.config)).eval()
        untrained.centre = snap.scorer.centre
        out: dict[str, Any] = {"untrained": metric(y, untrained.score(q, t, lex)), "sizes": {}}
        for size in sizes:
            runs = out["sizes"][str(size)] = []
            for seed in SEEDS:
                sample = train.sample(n=min(size, len(train)), random_state=seed)
                scorer, report = train_scorer(snap, sample, show_progress=False, seed=seed)
                mlp, _ = train_scorer(
                    snap, sample, show_progress=False, seed=seed, form=ScorerForm.MLP, require_win=False
                )
                run = {"pairs": len(sample), "seed": seed, "chosen": report.chosen}
                run |= {"published": metric(y, scorer.score(q, t, lex)), "mlp_anyway": metric(y, mlp.score(q, t, lex))}
                runs.append(run)
                print(f"{bundle} {run}", flush=True)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--json", default="results/eval_few_pairs.json")
    args = parser.parse_args()
    sets = {
        "STS-B test (Spearman; sampled from train)": ("bench-sts", ds.sts("train"), ds.sts("test"), rho),
        "MRPC test (ROC-AUC; sampled from train)": ("bench-mrpc", ds.mrpc("train"), ds.mrpc("test"), roc_auc),
        "LCQMC test (ROC-AUC; sampled from dev)": ("bench-lcqmc", ds.lcqmc("dev"), ds.lcqmc("test"), roc_auc),
    }
    results = {name: one_set(*spec, args.sizes) for name, spec in sets.items()}
    print(
        "| set | pairs | untrained | chosen (3 samples) | published: mean / worst change | MLP anyway: mean / worst |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        for size, runs in r["sizes"].items():
            chosen = ", ".join(x["chosen"] for x in runs)
            published = np.array([x["published"] for x in runs]) - r["untrained"]
            anyway = np.array([x["mlp_anyway"] for x in runs]) - r["untrained"]
            cells = f"{100 * published.mean():+.2f} / {100 * published.min():+.2f}"
            cells += f" | {100 * anyway.mean():+.2f} / {100 * anyway.min():+.2f}"
            print(f"| {name} | {size} | {r['untrained']:.4f} | {chosen} | {cells} |")
    ds.write_json(args.json, results)


if __name__ == "__main__":
    main()
