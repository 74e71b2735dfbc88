"""Encoder fine-tuning figures on the public sets in ../shared/data (issue #11).

    .venv/bin/python scripts/eval_finetune.py [--only sts scifact] [--json results/eval_finetune.json]

- sts: a bundle of every STS-B sentence; `Matcher.finetune` (what `matching finetune` runs) on sts-train with
  sts-dev for early stopping; sts-test Spearman of `score_pairs` and of the cosine, before and after. The same
  encoders on MRPC test (another set of the task): ROC-AUC and Spearman of the cosine, untouched vs fine-tuned.
- scifact: the corpus (title + text) bundle; `finetune` on the train qrels (positives only: in-batch + mined
  negatives, 10% of the train queries for early stopping; the reranker retrained after it); test nDCG@10 of
  dense and hybrid retrieval and of the rerank, before and after, on all test queries and on those whose
  relevant documents are no train positive.
Bundles are rebuilt in indexes/bench-ft-* each run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets as ds

from matching import Matcher
from matching.evaluate import evaluate, load_qrels, load_queries
from matching.metrics import roc_auc, spearman

OUT = Path("indexes")


def cosine(m: Matcher, frame: pd.DataFrame) -> np.ndarray:
    q, t = m.encode_pairs(frame["query"].tolist(), frame["title"].tolist())
    return np.einsum("ij,ij->i", q, t)


def finetune_between(
    m: Matcher, measure: Any, train: pd.DataFrame, valid: pd.DataFrame | None, settings: dict[str, Any], label: str
) -> dict[str, Any]:
    """``measure()`` before and after ``m.finetune(train, valid)``; prints both and the training table."""
    out: dict[str, Any] = {"before": measure()}
    started = time.perf_counter()
    report = m.finetune(train, valid, **settings)
    out["finetune_seconds_with_reencode"] = time.perf_counter() - started
    out["report"] = report.to_dict()
    out["after"] = measure()
    print(report.table())
    for key in out["before"]:
        print(f"{label}{key:28} {out['before'][key]:.4f} -> {out['after'][key]:.4f}")
    m.close()
    return out


def sts(settings: dict[str, Any]) -> dict[str, Any]:
    train, dev, test, mrpc = ds.sts("train"), ds.sts("dev"), ds.sts("test"), ds.mrpc("test")
    titles = pd.concat([train, dev, test])["title"].drop_duplicates().tolist()
    m = Matcher.build(
        pd.DataFrame({"id": range(len(titles)), "title": titles}),
        OUT / "bench-ft-sts",
        overwrite=True,
        show_progress=False,
    )
    labels, mrpc_labels = test["label"].to_numpy(), mrpc["label"].to_numpy()

    def measure() -> dict[str, float]:
        mrpc_cos = cosine(m, mrpc)
        return {
            "sts_test_score_pairs": spearman(m.score_pairs(test["query"].tolist(), test["title"].tolist()), labels),
            "sts_test_cosine": spearman(cosine(m, test), labels),
            "mrpc_test_cosine_roc_auc": roc_auc(mrpc_labels, mrpc_cos),
            "mrpc_test_cosine_spearman": spearman(mrpc_cos, mrpc_labels),
        }

    return finetune_between(m, measure, train, dev, settings, label="")


def scifact(settings: dict[str, Any]) -> dict[str, Any]:
    base = ds.require("beir_scifact")
    queries = load_queries(base / "queries.jsonl")
    test_qrels = load_qrels(base / "qrels" / "test.tsv")
    train_qrels = load_qrels(base / "qrels" / "train.tsv")
    train_docs = {d for rel in train_qrels.values() for d in rel}
    unseen = {q: rel for q, rel in test_qrels.items() if not set(rel) & train_docs}
    m = ds.build_scifact(OUT / "bench-ft-scifact")

    def measure() -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name, qrels in (("all", test_qrels), ("unseen_docs", unseen)):
            columns = evaluate(m, queries, qrels).columns
            for way in ("dense", "hybrid", "reranked"):
                result[f"{name}_{way}"] = columns[way]["ndcg@10"]
        return result

    out = finetune_between(m, measure, ds.scifact_pairs("train"), None, settings, label="ndcg@10 ")
    return {"test_queries": len(test_qrels), "unseen_doc_queries": len(unseen), **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=["sts", "scifact"])
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--json", default="results/eval_finetune.json")
    args = parser.parse_args()
    settings = {"epochs": args.epochs} if args.epochs else {}
    runs = {"sts": sts, "scifact": scifact}
    results = {name: runs[name](settings) for name in args.only}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
