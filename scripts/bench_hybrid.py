"""One hybrid search at a time on a 1M bundle (issue #23): latency end to end and by part, side by side in one
run: as searches run now (the query encoded on a worker thread while BM25 runs: matching.overlap.encode_aside;
BM25's top-k pruned by MaxScore), encoding first, and encoding first with every posting list added up in full.

    .venv/bin/python scripts/bench_hybrid.py                       # results/changes/bundle-1000000
    .venv/bin/python scripts/bench_hybrid.py --bundle PATH --queries 300

The bundle is scripts/bench_changes.py's (1M generated product titles). End to end, each setting searches every
query in a block, back to back (``--gap-ms``: with a pause after each), the blocks in turn for ``--rounds``;
the parts are timed query by query. Every query's BM25 top ``candidates`` must be the same rows with the same
scores pruned and in full. Prints a table and writes JSON (default results/bench_hybrid.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matching import Matcher, overlap
from matching.demo import generate_queries
from matching.lexical.bm25 import BM25Index


def pct(ms: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def clock(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1000, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="results/changes/bundle-1000000")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="blocks of all queries per end-to-end setting")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="idle time after each search (a user's pause)")
    parser.add_argument("--json", default="results/bench_hybrid.json")
    args = parser.parse_args()

    m = Matcher.load(args.bundle, verify=False)
    lexical = m.snapshot.lexical
    if not isinstance(lexical, BM25Index):
        raise SystemExit(f"{args.bundle}: needs a bundle with the BM25 lexical index")
    queries = generate_queries(args.queries)
    for q in generate_queries(100, seed=99):  # warm-up: traced encoder shapes, page cache
        m.search(q, k=args.k, candidates=args.candidates)

    # end to end: (encode aside, BM25 pruned) as searches run now; encoding first (pruned, then lists in full)
    settings = {"e2e": (True, True), "e2e_inline": (False, True), "e2e_inline_full": (False, False)}
    times: dict[str, list[float]] = {name: [] for name in (*settings, "encode", "dense", "bm25", "bm25_full")}
    same = 0
    for i, q in enumerate(queries):
        found = {}
        for pruning in (True, False) if i % 2 else (False, True):  # the second finds q's lists in the cache
            lexical.pruning = pruning
            ms, found[pruning] = clock(lambda q=q: lexical.search([q], args.candidates))
            times["bm25" if pruning else "bm25_full"].append(ms)
        (s1, r1), (s2, r2) = found[True], found[False]
        same += int(np.array_equal(r1, r2) and np.array_equal(s1, s2))
        ms, vectors = clock(lambda q=q: m.query_encoder.encode_queries([q]))
        times["encode"].append(ms)
        times["dense"].append(clock(lambda v=vectors: m.index.search(v, args.candidates, stored=m.store.vectors))[0])
    for _ in range(args.rounds):  # each setting over all queries in a block, the blocks in turn
        for name, (aside, pruning) in settings.items():
            overlap.ENCODE_ASIDE, lexical.pruning = aside, pruning
            for q in queries:
                times[name].append(clock(lambda q=q: m.search(q, k=args.k, candidates=args.candidates))[0])
                if args.gap_ms:
                    time.sleep(args.gap_ms / 1000)
    batch: dict[str, list[float]] = {"aside": [], "first": []}
    for _ in range(args.rounds):  # all queries in one search_batch call
        for name, aside in (("aside", True), ("first", False)):
            overlap.ENCODE_ASIDE = aside
            batch[name].append(clock(lambda: m.search_batch(queries, k=args.k, candidates=args.candidates))[0])
    overlap.ENCODE_ASIDE, lexical.pruning = True, True

    stats = {name: pct(values) for name, values in times.items()}
    result = {
        "bundle": args.bundle,
        "titles": len(m),
        "queries": len(queries),
        "k": args.k,
        "gap_ms": args.gap_ms,
        "rounds": args.rounds,
        "candidates": args.candidates,
        "bm25_top_k_equal_to_full": f"{same} of {len(queries)}",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "latency": stats,
        "inline_over_aside": stats["e2e_inline"]["median_ms"] / stats["e2e"]["median_ms"],
        "inline_full_over_aside": stats["e2e_inline_full"]["median_ms"] / stats["e2e"]["median_ms"],
        "bm25_full_over_pruned": stats["bm25_full"]["median_ms"] / stats["bm25"]["median_ms"],
        "search_batch_ms": {name: min(values) for name, values in batch.items()},
    }
    print(f"{len(m):,} titles, {len(queries)} queries, k={args.k}, candidates={args.candidates}, gap {args.gap_ms} ms")
    print(f"{'part':<34} {'median ms':>10} {'p99 ms':>8}")
    names = {
        "e2e": "hybrid search (encoded aside)",
        "e2e_inline": "  encoded first",
        "e2e_inline_full": "  encoded first, BM25 lists in full",
        "encode": "  query encoding",
        "dense": "  dense top-candidates",
        "bm25": f"  BM25 top-{args.candidates}, pruned",
        "bm25_full": f"  BM25 top-{args.candidates}, lists in full",
    }
    for key, label in names.items():
        print(f"{label:<34} {stats[key]['median_ms']:>10.2f} {stats[key]['p99_ms']:>8.2f}")
    print(
        f"BM25 top-k equal to the full sums: {result['bm25_top_k_equal_to_full']}; medians: BM25 full/pruned "
        f"{result['bm25_full_over_pruned']:.2f}x; search encoded first/aside {result['inline_over_aside']:.2f}x, "
        f"and with BM25 in full {result['inline_full_over_aside']:.2f}x"
    )
    print(
        f"search_batch of all {len(queries)} queries, best of {args.rounds}: encoded aside "
        f"{min(batch['aside']):.0f} ms, encoded first {min(batch['first']):.0f} ms "
        f"({min(batch['first']) / min(batch['aside']):.2f}x)"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
