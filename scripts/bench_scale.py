"""Scale runs for issue #4: 10k / 100k / 1M generated product titles.

    .venv/bin/python scripts/bench_scale.py                       # build (once) and measure all sizes
    .venv/bin/python scripts/bench_scale.py --sizes 10000 100000  # smaller run

The 1M catalogue is written once to results/scale/ and built once with `matching build` under
/usr/bin/time -v (build time and peak RSS; that bundle's vectors.f32 is the cache of encoded vectors).
Each size then gets its own bundle made from the first n stored vectors (no re-encoding) with the
default automatic index, and is measured: index build time, index RAM (the FAISS index's serialised
size), bytes per title on disk, single-query latency end to end (encode + retrieve 100 + exact refine +
rerank + store fetch) and of the query encoder alone, and Recall@10 of retrieval against exact search.
Prints a table and writes JSON (default results/bench_scale.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from matching.demo import generate_large_catalogue, generate_queries  # noqa: E402
from matching.exact import exact_top_k  # noqa: E402
from matching.matcher import Matcher  # noqa: E402
from matching.metrics import neighbour_recall  # noqa: E402


def build_big(csv: Path, bundle: Path, preset: str, size: int) -> dict[str, object]:
    """Write the catalogue (if missing) and `matching build` it under /usr/bin/time -v (if missing)."""
    csv.parent.mkdir(parents=True, exist_ok=True)
    if not csv.exists():
        start = time.perf_counter()
        generate_large_catalogue(size).to_csv(csv, index=False)
        print(f"wrote {size} titles to {csv} in {time.perf_counter() - start:.0f} s", flush=True)
    record_file = bundle.parent / f"{bundle.name}.build.json"
    if bundle.exists() and record_file.exists():
        return dict(json.loads(record_file.read_text()))
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "matching", "build", str(csv), "--out", str(bundle)]
    cmd += ["--preset", preset, "--overwrite", "-q"]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    print(done.stdout + done.stderr[-3000:], flush=True)
    if done.returncode:
        raise SystemExit(f"build failed ({done.returncode})")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))  # type: ignore[union-attr]
    record = {"command": " ".join(cmd), "wall_seconds": wall, "peak_rss_mb": rss_kb / 1024, "titles": size}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def derive(big: Path, n: int, out: Path) -> tuple[Matcher, float]:
    """A bundle of the first ``n`` titles of ``big``, reusing its stored vectors; returns it and the build time."""
    with Matcher.load(big, verify=False) as src:
        start = time.perf_counter()
        sub = src.copy(out, limit=n, overwrite=True, show_progress=False)
        return sub, time.perf_counter() - start


def pct(ms: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def measure(m: Matcher, queries: list[str], index_seconds: float, query_preset: str | None) -> dict[str, object]:
    if query_preset:
        m.query_encoder.set_preset(query_preset)
    gen = m.path / str(m.generation)  # type: ignore[operator]
    disk = sum(f.stat().st_size for f in gen.iterdir() if f.is_file())
    for q in generate_queries(100, seed=99):
        m.search(q)  # warm-up: the traced encoder specialises on the first shapes it sees; page cache
    enc, e2e, dense = [], [], []
    for q in queries:  # hybrid (the default) and dense interleaved, so both see the same machine state
        t0 = time.perf_counter()
        m.query_encoder.encode_queries([q])
        t1 = time.perf_counter()
        m.search(q, k=10, candidates=100)
        t2 = time.perf_counter()
        m.search(q, k=10, candidates=100, retrieval="dense")
        t3 = time.perf_counter()
        enc.append((t1 - t0) * 1000)
        e2e.append((t2 - t1) * 1000)
        dense.append((t3 - t2) * 1000)
    qv = m.query_encoder.encode_queries(queries)
    _, exact = exact_top_k(m.store.vectors, qv, 10)
    # what search retrieves before the rerank: 100 candidates (exactly refined where the index is lossy)
    _, found = m.index.search(qv, 100, stored=m.store.vectors)
    return {
        "titles": len(m),
        "factory": m.manifest.factory,
        "index": m.manifest.index,
        "copy_and_index_seconds": index_seconds,
        "index_ram_mb": (gen / "index.faiss").stat().st_size / 2**20,
        "bytes_per_title_on_disk": disk / len(m),
        "query_encoder": pct(enc),
        "search_end_to_end": pct(e2e),
        "dense_search_end_to_end": pct(dense),
        "recall_at_10_vs_exact": neighbour_recall(found, exact, 10),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--preset", default="default", help="encoder preset for the one-off 1M build")
    parser.add_argument("--query-presets", nargs="+", default=["default", "fast"], help="presets to time queries with")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--work", default="results/scale", help="where the catalogue and bundles go")
    parser.add_argument("--json", default="results/bench_scale.json")
    args = parser.parse_args()

    work = Path(args.work)
    top = max(args.sizes)
    big = work / f"bundle-{top}"
    build = build_big(work / f"catalogue-{top}.csv", big, args.preset, top)
    queries = generate_queries(args.queries)
    rows = []
    for n in sorted(args.sizes):
        m, index_seconds = derive(big, n, work / f"bundle-{n}-derived")
        with m:
            for preset in args.query_presets:
                row = {"query_preset": preset, **measure(m, queries, index_seconds, preset)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "build": build,
        "sizes": rows,
        "queries": args.queries,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    }
    print(f"\n1M build: {build['wall_seconds']:.0f} s, peak RSS {build['peak_rss_mb']:.0f} MB ({build['command']})")
    head = f"{'titles':>9} {'queries':<8} {'index':<16} {'param':>10} {'build s':>8} {'RAM MB':>7} {'B/title':>8} "
    head += f"{'enc med':>8} {'e2e med':>8} {'e2e p99':>8} {'R@10':>6}"
    print(head)
    for r in rows:
        index = r["index"]
        param = f"nprobe={index['nprobe']}" if index.get("nprobe") else "-"  # type: ignore[union-attr,index]
        print(
            f"{r['titles']:>9} {r['query_preset']:<8} {r['factory']:<16} {param:>10} "
            f"{r['copy_and_index_seconds']:>8.1f} "
            f"{r['index_ram_mb']:>7.1f} {r['bytes_per_title_on_disk']:>8.0f} "
            f"{r['query_encoder']['median_ms']:>8.2f} {r['search_end_to_end']['median_ms']:>8.2f} "  # type: ignore[index]
            f"{r['search_end_to_end']['p99_ms']:>8.2f} {r['recall_at_10_vs_exact']:>6.3f}"  # type: ignore[index]
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
