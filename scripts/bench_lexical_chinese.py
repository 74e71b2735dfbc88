"""BM25 top-k on a large Chinese catalogue, per analyser, MaxScore-pruned against every posting list read in full.

The catalogue: ``--size`` titles, each the first half of one LCQMC sentence and the second half of another (a
generator seeded 0), so the titles read as Chinese questions and their words and characters have LCQMC's
frequencies; the queries: 300 LCQMC sentences. For each analyser one BM25 index is built, then every query is
searched one at a time for the top 10 and the top 100 (what a hybrid search asks BM25 for), pruned and in full,
and the two must give the same rows and scores. Needs jieba (``matching[cjk]``) and ../shared/data/lcqmc.

    .venv/bin/python scripts/bench_lexical_chinese.py                 # 1M titles, about 5 minutes
    .venv/bin/python scripts/bench_lexical_chinese.py --size 100000
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import datasets as ds
import numpy as np

from matching.analysis import Analyzer
from matching.lexical.bm25 import BM25Index

ANALYSERS = [Analyzer.CHINESE, Analyzer.CHINESE_MIXED, Analyzer.CHINESE_CHARS, Analyzer.CJK]


def catalogue(size: int, queries: int) -> tuple[list[str], list[str]]:
    """``size`` generated titles and ``queries`` LCQMC sentences (seeded)."""
    sentences = ds.lcqmc_sentences()
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, len(sentences), size), rng.integers(0, len(sentences), size)
    titles = [
        sentences[i][: len(sentences[i]) // 2 + 1] + sentences[j][len(sentences[j]) // 2 :]
        for i, j in zip(first.tolist(), second.tolist(), strict=True)
    ]
    return titles, [sentences[i] for i in rng.integers(0, len(sentences), queries).tolist()]


def timed(index: BM25Index, queries: list[str], k: int) -> tuple[list[float], np.ndarray, np.ndarray]:
    """Milliseconds of each query's search alone, and every query's scores and rows."""
    ms, scores, rows = [], [], []
    for query in queries:
        start = time.perf_counter()
        s, r = index.search([query], k)
        ms.append((time.perf_counter() - start) * 1000)
        scores.append(s[0])
        rows.append(r[0])
    return ms, np.array(scores), np.array(rows)


def measure(index: BM25Index, queries: list[str], k: int) -> dict[str, Any]:
    index.search(queries[:20], k)  # warm
    out: dict[str, Any] = {}
    answers = []
    for name, pruning in (("pruned", True), ("in full", False)):
        index.pruning = pruning
        ms, scores, rows = timed(index, queries, k)
        out[name] = {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}
        answers.append((scores, rows))
    index.pruning = True
    (s1, r1), (s2, r2) = answers
    same = (r1 == r2).all(axis=1) & (s1 == s2).all(axis=1)  # -inf pads compare equal
    out["same"] = int(same.sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--json", default="results/bench_lexical_chinese.json")
    args = parser.parse_args()
    titles, queries = catalogue(args.size, args.queries)
    BM25Index.build(titles[:100], Analyzer.CHINESE)  # jieba loads its dictionary once, outside the timings
    result: dict[str, Any] = {"size": args.size, "queries": len(queries), "analysers": {}}
    print(f"{args.size:,} titles, {len(queries)} queries, one at a time; BM25 top-k median / p99 ms")
    print(f"{'analyser':14s} {'build s':>8s} {'k':>4s} {'pruned':>15s} {'in full':>15s} {'full/pruned':>11s} same")
    for analyser in ANALYSERS:
        start = time.perf_counter()
        index = BM25Index.build(titles, analyser)
        assert isinstance(index, BM25Index)
        built = time.perf_counter() - start
        row: dict[str, Any] = {"build_seconds": built}
        for k in (10, 100):
            m = row[f"top{k}"] = measure(index, queries, k)
            pruned, full = m["pruned"], m["in full"]
            print(
                f"{analyser.value:14s} {built:8.1f} {k:4d} {pruned['median_ms']:7.2f} {pruned['p99_ms']:7.2f} "
                f"{full['median_ms']:7.2f} {full['p99_ms']:7.2f} {full['median_ms'] / pruned['median_ms']:10.2f}x "
                f"{m['same']}/{len(queries)}"
            )
        result["analysers"][analyser.value] = row
        del index
    ds.write_json(args.json, result)


if __name__ == "__main__":
    main()
