"""Build throughput and single-query latency of a bundle (issue #2/#3 figures).

    .venv/bin/python scripts/bench_query.py                 # SciFact (title + text) from ../shared/data
    .venv/bin/python scripts/bench_query.py --demo          # the generated demo catalogue instead

Prints a table and writes JSON (default results/bench_query.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matching import Matcher
from matching.demo import DEMO_QUERIES, generate_catalogue


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def timed(fn, queries: list[str]) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="use the generated demo catalogue, not SciFact")
    parser.add_argument("--queries", type=int, default=300, help="single queries to time")
    parser.add_argument("--json", default="results/bench_query.json")
    args = parser.parse_args()

    if args.demo:
        catalogue, id_col, title_cols = generate_catalogue(3000), "id", ["title"]
        queries = (DEMO_QUERIES * (args.queries // len(DEMO_QUERIES) + 1))[: args.queries]
        name = "demo (3,000 generated product titles)"
    else:
        from datasets import require, scifact_corpus

        from matching.evaluate import load_qrels, load_queries

        catalogue, id_col, title_cols = scifact_corpus(), "_id", ["title", "text"]
        base = require("beir_scifact")
        qtext = load_queries(base / "queries.jsonl")
        queries = [qtext[q] for q in load_qrels(base / "qrels" / "test.tsv")][: args.queries]
        name = "BEIR SciFact corpus (5,183 abstracts, title + text, up to 256 tokens)"

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        m = Matcher.build(catalogue, Path(tmp) / "b", id_column=id_col, title_column=title_cols, show_progress=False)
        build_s = time.perf_counter() - start
        for q in queries[:10]:
            m.search(q)  # warm-up
        encoder_ms = timed(lambda q: m.query_encoder.encode_queries([q]), queries)
        # interleaved, so drift on a shared machine hits both alike; their difference is the rerank's cost
        search_ms, norerank_ms = [], []
        for q in queries:
            search_ms += timed(lambda q: m.search(q, k=10, candidates=100), [q])
            norerank_ms += timed(lambda q: m.search(q, k=10, candidates=100, rerank=False), [q])
        added_ms = [a - b for a, b in zip(search_ms, norerank_ms, strict=True)]
        qv = m.query_encoder.encode_queries(queries[:1])
        cands = np.asarray(m.store.vectors[:100])
        rerank_ms = [0.0] * len(queries)
        for i in range(len(queries)):
            start = time.perf_counter()
            m.scorer.score(qv, cands)
            rerank_ms[i] = (time.perf_counter() - start) * 1000
        m.close()

    result = {
        "catalogue": name,
        "titles": len(catalogue),
        "build_seconds": build_s,
        "build_titles_per_s": len(catalogue) / build_s,
        "query_encoder": percentiles(encoder_ms),
        "search_end_to_end": percentiles(search_ms),
        "search_without_rerank": percentiles(norerank_ms),
        "rerank_100_candidates": percentiles(rerank_ms),
        "added_by_rerank": percentiles(added_ms),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
    }
    print(f"{name}: {len(catalogue)} titles")
    print(f"build: {build_s:.1f} s = {result['build_titles_per_s']:.0f} titles/s (encode + store + index)")
    print(f"{'single query (ms)':<34}{'median':>8}{'p99':>8}")
    keys = ("query_encoder", "search_end_to_end", "search_without_rerank", "rerank_100_candidates", "added_by_rerank")
    for key in keys:
        print(f"{key:<34}{result[key]['median_ms']:>8.2f}{result[key]['p99_ms']:>8.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
