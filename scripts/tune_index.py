"""Index-for-the-size measurements (issue #4) on synthetic clustered unit vectors.

    /tmp/venv/bin/python scripts/tune_index.py --n 100000 1000000
    /tmp/venv/bin/python scripts/tune_index.py --n 100000 --factory IVF1024,PQ48 --factory HNSW32,SQ8

For each size: choose_index (or each --factory override), build (train + add, timed), serialised index size,
build-time tuning of nprobe/efSearch to Recall@10 >= target after the exact refine, then on fresh held-out
queries: Recall@10 vs exact and single-query latency (index search + exact refine from the on-disk memmap) with
1 and 2 FAISS threads. Writes JSON (default results/tune_index.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from matching.exact import exact_refine, exact_top_k
from matching.metrics import neighbour_recall as recall_at_k
from matching.vectors.autoindex import (
    IndexChoice,
    auto_tune,
    choice_for_factory,
    choose_index,
    retrieve,
    sample_queries,
)


def clustered_vectors(path: Path, n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """A hierarchical Gaussian mixture of unit vectors written to a float32 memmap (like the store's vectors.f32).

    Topics -> ``centres`` sub-clusters -> points, with a power-law spectrum (anisotropic, low effective dimension),
    a shared mean direction (sentence embeddings all lean one way) and lognormal cluster sizes; random pairs have
    cosine ~0.15 and nearest neighbours ~0.85-0.9, roughly like MiniLM title vectors.
    """
    rng = np.random.default_rng(seed)
    spec = (np.arange(1, dim + 1, dtype=np.float32) ** -0.6).astype(np.float32)
    spec *= math.sqrt(dim) / np.linalg.norm(spec)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    mean = unit(rng.standard_normal(dim))
    topics = unit(unit(rng.standard_normal((max(8, centres // 40), dim)) * spec) + 0.45 * mean)
    parent = rng.integers(0, len(topics), centres)
    c = unit(topics[parent] + TOPIC_SPREAD * unit(rng.standard_normal((centres, dim)) * spec))
    weights = rng.lognormal(0.0, 1.0, centres)
    weights /= weights.sum()
    spread = rng.uniform(0.4, 0.8, centres).astype(np.float32) / math.sqrt(dim)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, 65_536):
        m = min(65_536, n - start)
        a = rng.choice(centres, size=m, p=weights)
        out[start : start + m] = unit(c[a] + rng.standard_normal((m, dim)).astype(np.float32) * spec * spread[a, None])
    out.flush()
    return np.load(path, mmap_mode="r")


TOPIC_SPREAD = 0.8


def build(vectors: np.ndarray, choice: IndexChoice, seed: int) -> tuple[Any, dict[str, float]]:
    """Train on ``choice.train_size`` random rows and add everything under ids 0..n-1, as VectorIndex.build."""
    n, dim = vectors.shape
    base = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    if not base.is_trained:
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, size=min(n, max(choice.train_size, 1)), replace=False))
        base.train(np.ascontiguousarray(vectors[take]))
    t1 = time.perf_counter()
    index = faiss.IndexIDMap(base)
    for start in range(0, n, 65_536):
        block = np.ascontiguousarray(vectors[start : start + 65_536])
        index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
    t2 = time.perf_counter()
    return index, {"train_s": t1 - t0, "add_s": t2 - t1, "build_s": t2 - t0}


def latency(index: Any, vectors: np.ndarray, queries: np.ndarray, choice: IndexChoice, candidates: int) -> Any:
    """Per-query ms for the index search and the exact refine, single query at a time."""
    fetch = choice.refine_k(candidates)
    search_ms, refine_ms = [], []
    for q in queries:
        q1 = q[None, :]
        t0 = time.perf_counter()
        _, ids = index.search(q1, fetch)
        t1 = time.perf_counter()
        if choice.refine:
            exact_refine(q1, ids, vectors, candidates)
        t2 = time.perf_counter()
        search_ms.append((t1 - t0) * 1e3)
        refine_ms.append((t2 - t1) * 1e3)
    total = np.add(search_ms, refine_ms)

    def pct(x: Any) -> dict[str, float]:
        return {"median_ms": round(float(np.median(x)), 3), "p99_ms": round(float(np.percentile(x, 99)), 3)}

    return {"search": pct(search_ms), "refine": pct(refine_ms), "total": pct(total)}


def run_one(vectors: np.ndarray, choice: IndexChoice, args: argparse.Namespace) -> dict[str, Any]:
    n, dim = vectors.shape
    faiss.omp_set_num_threads(args.threads_build)
    index, times = build(vectors, choice, args.seed)
    size = int(faiss.serialize_index(index).nbytes)
    print(f"  built {choice.factory}: {times}  size {size / 2**20:.1f} MiB", flush=True)
    t0 = time.perf_counter()
    tuned = auto_tune(
        index, vectors, choice, k=args.k, candidates=args.candidates, target_recall=args.target, seed=args.seed + 1
    )
    times["tune_s"] = time.perf_counter() - t0
    print(f"  tuned: {tuned['param']}={tuned['value']} recall {tuned['recall']:.4f} {tuned['evaluated']}", flush=True)
    fetch = choice.refine_k(max(args.k, args.candidates))
    held_out: dict[str, Any] = {}
    lat_queries = None
    for noise in args.eval_noise:
        level = float(noise) if "-" not in noise else tuple(float(x) for x in noise.split("-"))
        q, _ = sample_queries(vectors, args.eval_queries, noise=level, seed=args.seed + 100 + len(held_out))
        _, exact = exact_top_k(vectors, q, args.k)
        _, raw = index.search(q, args.k)
        refined = retrieve(index, q, args.k, stored_vectors=vectors if choice.refine else None, candidates=fetch)[1]
        cos = float(np.mean(np.sum(q * np.asarray(vectors[exact[:, 0]]), axis=1)))
        held_out[f"noise={noise}"] = {
            "recall_at_k_refined": round(recall_at_k(refined, exact, args.k), 4),
            "recall_at_k_no_refine": round(recall_at_k(raw, exact, args.k), 4),
            "mean_top1_cosine": round(cos, 3),
        }
        if lat_queries is None:
            lat_queries = q[: args.latency_queries]
    print(f"  held-out: {held_out}", flush=True)
    lat = {}
    assert lat_queries is not None
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        latency(index, vectors, lat_queries[:20], choice, args.candidates)  # warm-up
        lat[f"threads={threads}"] = latency(index, vectors, lat_queries, choice, args.candidates)
    print(f"  latency: {lat}", flush=True)
    return {
        "n": n,
        "dim": dim,
        "choice": {k: v for k, v in choice.__dict__.items() if not (isinstance(v, float) and math.isnan(v))},
        "expected_bytes": choice.expected_bytes(n) if choice.reason != "user override" else None,
        "serialized_bytes": size,
        "times_s": {k: round(v, 2) for k, v in times.items()},
        "tuned": tuned,
        "fetch": fetch,
        "held_out": held_out,
        "latency": lat,
    }


def data_stats(vectors: np.ndarray, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    a = np.asarray(vectors[np.sort(rng.choice(len(vectors), 200, replace=False))])
    b = np.asarray(vectors[np.sort(rng.choice(len(vectors), 200, replace=False))])
    s, _ = exact_top_k(vectors, a, 2)
    return {"random_pair_cos": round(float(np.mean(a @ b.T)), 3), "nn_cos": round(float(np.mean(s[:, 1])), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--centres", type=int, default=0, help="mixture centres (default ~ n/50, 200..4000)")
    p.add_argument("--factory", action="append", default=[], help="override(s) instead of choose_index")
    p.add_argument("--budget-mib", type=float, default=None)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--eval-queries", type=int, default=500)
    p.add_argument("--eval-noise", nargs="+", default=["0.3-1.5", "0.3", "0.75", "1.5"], help="level or lo-hi")
    p.add_argument("--latency-queries", type=int, default=300)
    p.add_argument("--threads-build", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/tune_index.json"))
    args = p.parse_args()
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "faiss": faiss.__version__},
        "note": "timings taken while other jobs (encoder benchmarks) loaded the same 2-core machine",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("TUNE_TMP")) as tmp:
        for n in args.n:
            centres = args.centres or int(min(4000, max(200, n // 50)))
            t0 = time.perf_counter()
            vectors = clustered_vectors(Path(tmp) / f"v{n}.npy", n, args.dim, centres, args.seed)
            stats = data_stats(vectors, args.seed)
            print(f"n={n} centres={centres} generated in {time.perf_counter() - t0:.1f}s {stats}", flush=True)
            budget = None if args.budget_mib is None else int(args.budget_mib * 2**20)
            choices = [choice_for_factory(f, n) for f in args.factory] or [
                choose_index(n, args.dim, memory_budget_bytes=budget)
            ]
            for choice in choices:
                print(f"  {choice.factory}: {choice.reason}", flush=True)
                run = run_one(vectors, choice, args)
                run["data"] = {"centres": centres, **stats}
                results["runs"].append(run)
            del vectors
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
