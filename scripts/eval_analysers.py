"""The Chinese analysers side by side on LCQMC dev and test: the lexical share's ROC-AUC and the BM25 index's cost.

For each analyser, one BM25 index over every distinct LCQMC sentence (dev and test, both sides, as the eval
bundles hold them); each pair's lexical share is BM25(query, title) over BM25(query, query), clipped to 1, as the
fusion reads it. Character-bigram Jaccard is printed beside them for reference. Needs jieba (``matching[cjk]``).

    .venv/bin/python scripts/eval_analysers.py    # about a minute; JSON in results/eval_analysers.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import datasets as ds
import numpy as np

from matching.analysis import Analyzer
from matching.features import normalised, query_norms
from matching.lexical import LexicalIndex
from matching.metrics import roc_auc

ANALYSERS = [Analyzer.CHINESE, Analyzer.CHINESE_MIXED, Analyzer.CHINESE_CHARS, Analyzer.CJK]


def bigram_jaccard(a: str, b: str) -> float:
    """Jaccard similarity of the two texts' character bigrams (spaces dropped)."""
    x, y = ("".join(t.split()) for t in (a, b))
    ga, gb = {x[i : i + 2] for i in range(len(x) - 1)}, {y[i : i + 2] for i in range(len(y) - 1)}
    return len(ga & gb) / len(ga | gb) if ga | gb else 0.0


def lexical_shares(index: LexicalIndex, queries: list[str], titles: list[str]) -> np.ndarray:
    """Each pair's BM25 over the query's own BM25, clipped to [0, 1]."""
    norms = query_norms(index, queries)
    return np.array(
        [normalised(index.score_texts(q, [t]), n)[0] for q, t, n in zip(queries, titles, norms, strict=True)],
        dtype=np.float32,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="results/eval_analysers.json")
    args = parser.parse_args()
    splits = {name: ds.lcqmc(name) for name in ("dev", "test")}
    sentences = ds.lcqmc_sentences()
    queries = sentences[:2000]
    results: dict[str, Any] = {"bigram jaccard": {}}
    for name, f in splits.items():
        jaccard = [bigram_jaccard(q, t) for q, t in zip(f["query"], f["title"], strict=True)]
        results["bigram jaccard"][name] = roc_auc(f["label"].to_numpy(), np.array(jaccard))
    LexicalIndex.build(sentences[:100], Analyzer.CHINESE)  # jieba loads its dictionary once, outside the timings
    for analyser in ANALYSERS:
        start = time.perf_counter()
        index = LexicalIndex.build(sentences, analyser)
        built = time.perf_counter() - start
        start = time.perf_counter()
        index.search(queries, 10)
        searched = (time.perf_counter() - start) / len(queries)
        row: dict[str, Any] = {
            name: roc_auc(f["label"].to_numpy(), lexical_shares(index, f["query"].tolist(), f["title"].tolist()))
            for name, f in splits.items()
        }
        row |= {"build_seconds": built, "search_ms": searched * 1e3}
        results[analyser.value] = row
    print(f"{len(sentences):,} sentences; lexical share ROC-AUC, BM25 build and top-10 search of 2,000 of them")
    print(f"{'analyser':16s} {'dev':>7s} {'test':>7s} {'build s':>8s} {'ms/query':>9s}")
    for name, row in results.items():
        cost = f"{row['build_seconds']:8.2f} {row['search_ms']:9.3f}" if "search_ms" in row else ""
        print(f"{name:16s} {row['dev']:7.4f} {row['test']:7.4f} {cost}")
    ds.write_json(args.json, results)


if __name__ == "__main__":
    main()
