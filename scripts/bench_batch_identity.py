"""Do batched searches answer as searches one at a time? (issue #23: results identical to unbatched searches)

    .venv/bin/python scripts/bench_batch_identity.py                  # results/load/bundle-100000, 320 queries
    .venv/bin/python scripts/bench_batch_identity.py --bundle PATH --queries 320 --batches 4 16 64

In one process, torch on 1 thread: generated queries (and, so that widths differ, the same queries with a longer
tail) are encoded and searched one at a time (`Matcher.search`), then in groups of each `--batches` size
(`Matcher.search_batch`, one encoder pass a group). Counts the query vectors that are bit-identical and the searches
with the same ids in the same order, and the largest score difference. Prints a table and writes JSON
(results/bench_batch_identity.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from matching import Matcher  # noqa: E402
from matching.demo import generate_queries  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "results" / "load" / "bundle-100000")
    parser.add_argument("--queries", type=int, default=320)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_batch_identity.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    short = generate_queries(args.queries // 2, seed=3)
    queries = [*short, *(f"{q} that also fits a small flat and ships this week" for q in short)]
    rows = []
    with Matcher.load(args.bundle, verify=False) as m:
        alone_vectors = np.stack([m.encoder.encode_queries([q])[0] for q in queries])
        alone = [m.search(q) for q in queries]
        for size in args.batches:
            groups = [queries[i : i + size] for i in range(0, len(queries), size)]
            vectors = np.concatenate([m.encoder.encode_queries(group) for group in groups])
            batched = [hits for group in groups for hits in m.search_batch(group)]
            same_ids = sum([h.id for h in a] == [h.id for h in b] for a, b in zip(alone, batched, strict=True))
            pairs = [(x, y) for a, b in zip(alone, batched, strict=True) for x, y in zip(a, b, strict=True)]
            diff = max((abs(x.score - y.score) for x, y in pairs), default=0.0)
            rows.append(
                {
                    "batch": size,
                    "queries": len(queries),
                    "vectors_bit_identical": int((vectors == alone_vectors).all(axis=1).sum()),
                    "searches_same_ids_in_order": int(same_ids),
                    "largest_score_difference": float(diff),
                }
            )
    print(f"{len(queries)} queries, {args.bundle}, torch threads 1")
    print(f"{'batch':>5} {'vectors bit-identical':>22} {'same ids in order':>18} {'largest score diff':>19}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['vectors_bit_identical']:>18} / {r['queries']}"
            f" {r['searches_same_ids_in_order']:>12} / {r['queries']} {r['largest_score_difference']:>19.2e}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bundle": str(args.bundle), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
