"""Training figures on the public benchmarks in ../shared/data (issue #3).

    .venv/bin/python scripts/eval_train.py [--only scifact sts mrpc pairs] [--json results/eval_train.json]

- scifact: retrieval alone, + trained scorer, + fine-tuned query tower (+ scorer retrained), nDCG@10 on the
  official test qrels; training uses the train split, early stopping a 10% slice of its queries.
- sts: scorer trained on sts-train (early-stopped on sts-dev), Spearman on sts-test, against cosine.
- mrpc: scorer trained on train (early-stopped on val), threshold tuned on val; test accuracy/F1/ROC-AUC.
- pairs: score_pairs throughput with every title cached in the bundle versus none.
Bundles are rebuilt from scratch in indexes/bench-* each run.
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
from matching.metrics import best_threshold, classification_metrics, spearman

OUT = Path("indexes")


def sentence_bundle(name: str, frames: list[pd.DataFrame]) -> Matcher:
    """A bundle whose titles are every distinct title-side sentence of ``frames``."""
    titles = pd.concat(frames)["title"].drop_duplicates().tolist()
    catalogue = pd.DataFrame({"id": range(len(titles)), "title": titles})
    return Matcher.build(catalogue, OUT / f"bench-{name}", overwrite=True, show_progress=False)


def scifact() -> dict[str, Any]:
    base = ds.require("beir_scifact")
    queries = load_queries(base / "queries.jsonl")
    test_qrels = load_qrels(base / "qrels" / "test.tsv")
    train = ds.scifact_pairs("train")
    start = time.perf_counter()
    m = ds.build_scifact(OUT / "bench-scifact")
    out: dict[str, Any] = {"build_seconds": time.perf_counter() - start}
    out["retrieval"] = evaluate(m, queries, test_qrels).retrieval
    report = m.train_scorer(train, hard_negatives=20, show_progress=False)
    out["scorer_train"] = {
        "seconds": report.seconds,
        "best_epoch": report.best_epoch,
        "valid": report.best_metric,
    }
    out["scorer"] = evaluate(m, queries, test_qrels).reranked
    print(f"scifact: retrieval ndcg@10 {out['retrieval']['ndcg@10']:.4f}, +scorer {out['scorer']['ndcg@10']:.4f}")
    tower = m.train_query_tower(train, show_progress=False)
    out["tower_train"] = {
        "seconds": tower.seconds,
        "best_epoch": tower.best_epoch,
        "valid": tower.best_metric,
    }
    tower_eval = evaluate(m, queries, test_qrels)
    out["tower"] = tower_eval.retrieval
    report = m.train_scorer(train, hard_negatives=20, show_progress=False)
    out["tower_scorer_train"] = {"seconds": report.seconds, "best_epoch": report.best_epoch}
    out["tower_scorer"] = evaluate(m, queries, test_qrels).reranked
    print(f"scifact: +tower {out['tower']['ndcg@10']:.4f}, +tower+scorer {out['tower_scorer']['ndcg@10']:.4f}")
    m.close()
    return out


def sts() -> dict[str, Any]:
    train, dev, test = ds.sts("train"), ds.sts("dev"), ds.sts("test")
    m = sentence_bundle("sts", [train, dev, test])
    q, t = m.encode_pairs(test["query"].tolist(), test["title"].tolist())
    out: dict[str, Any] = {"cosine_spearman": spearman(np.einsum("ij,ij->i", q, t), test["label"].to_numpy())}
    report = m.train_scorer(train, dev, show_progress=False)
    scores = m.score_pairs(test["query"].tolist(), test["title"].tolist())
    out.update(scorer_spearman=spearman(scores, test["label"].to_numpy()), loss=report.loss)
    out["valid"] = {"baseline": report.baseline, "best": report.best_metric, "best_epoch": report.best_epoch}
    print(f"sts-b test spearman: cosine {out['cosine_spearman']:.4f}, scorer {out['scorer_spearman']:.4f}")
    m.close()
    return out


def mrpc() -> dict[str, Any]:
    train, val, test = ds.mrpc("train"), ds.mrpc("val"), ds.mrpc("test")
    m = sentence_bundle("mrpc", [train, val, test])

    def metrics(score: Any) -> dict[str, float]:
        threshold = best_threshold(val["label"].to_numpy(), score(val))
        return {
            **classification_metrics(test["label"].to_numpy(), score(test), threshold),
            "threshold": threshold,
        }

    def cosine(frame: pd.DataFrame) -> np.ndarray:
        q, t = m.encode_pairs(frame["query"].tolist(), frame["title"].tolist())
        return np.einsum("ij,ij->i", q, t)

    out: dict[str, Any] = {"cosine": metrics(cosine)}
    report = m.train_scorer(train, val, show_progress=False)
    out["scorer"] = metrics(lambda f: m.score_pairs(f["query"].tolist(), f["title"].tolist()))
    out["loss"] = report.loss
    for name in ("cosine", "scorer"):
        r = out[name]
        print(f"mrpc test {name}: accuracy {r['accuracy']:.4f} f1 {r['f1']:.4f} roc_auc {r['roc_auc']:.4f}")
    m.close()
    return out


def pairs() -> dict[str, Any]:
    frame = ds.sts("train")
    queries, titles = frame["query"].tolist(), frame["title"].tolist()
    cached = sentence_bundle("sts", [frame])
    # the same encoder with none of these titles in its store: every title is encoded
    empty = Matcher.build(
        pd.DataFrame({"id": [0], "title": ["placeholder"]}),
        OUT / "bench-empty",
        overwrite=True,
        show_progress=False,
    )
    out: dict[str, Any] = {"pairs": len(frame)}
    for name, m in (("cached", cached), ("uncached", empty)):
        m.score_pairs(queries[:64], titles[:64])  # warm-up
        start = time.perf_counter()
        m.score_pairs(queries, titles)
        out[f"{name}_pairs_per_s"] = len(frame) / (time.perf_counter() - start)
        m.close()
    out["speedup"] = out["cached_pairs_per_s"] / out["uncached_pairs_per_s"]
    print(
        f"score_pairs on {len(frame)} STS-B train pairs: cached {out['cached_pairs_per_s']:.0f} pairs/s, "
        f"uncached {out['uncached_pairs_per_s']:.0f} pairs/s ({out['speedup']:.2f}x)"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=["scifact", "sts", "mrpc", "pairs"])
    parser.add_argument("--json", default="results/eval_train.json")
    args = parser.parse_args()
    runs = {"scifact": scifact, "sts": sts, "mrpc": mrpc, "pairs": pairs}
    results = {name: runs[name]() for name in args.only}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
