"""What a catalogue change and a filtered search cost against catalogue size (issue #21), in one run.

    nice -n 5 .venv/bin/python scripts/bench_changes.py                          # 10k, 100k and 1M titles
    nice -n 5 .venv/bin/python scripts/bench_changes.py --sizes 10000 100000     # smaller run

The largest catalogue (scripts/bench_scale.py's generated product titles, plus two fields to filter on: `tier`, a
text whose values select 50%, 10%, 1%, 0.1% and 0.01% of the titles, and `score`, a number uniform in [0, 1)) is
built once with the defaults into results/changes/ (its build time is kept); each smaller size is a copy of its first
n titles (stored vectors, no re-encoding). For each size:

- one-title changes through the library (`add`, `upsert` of a changed title, `remove`), `--repeats` each: seconds
  per change, model load excluded (the matcher is loaded once);
- the filters: `tier == X` (equality, indexed text) and `score in [a, a + s)` (range, indexed number) for each
  selectivity s, answered by the columns and by the SQL scan alone (the code before the columns); search latency
  (the default hybrid retrieval, reranked, k=10, the query encoded) with the filter and without, over `--queries`
  generated queries; and dense recall@10 of the filtered search against exact search over the rows that pass
  (also with ties counted: titles repeat, and a hit as close as the 10th exact one is as good as it);
- at the largest size: hybrid search latency after `--segments` one-title adds (kept as a delta over the base files,
  matching.delta) against the same search once they are compacted; a 10,000-title add against encoding those titles
  alone, then `compact`.

Prints a table, writes results/bench_changes.json and, with matplotlib, results/bench_changes.png (change cost
against size; filter cost against selectivity; BENCHMARKS.md shows the copy in scripts/plots/).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from matching.demo import generate_large_catalogue, generate_queries  # noqa: E402
from matching.exact import exact_subset  # noqa: E402
from matching.matcher import Matcher  # noqa: E402

SELECTIVITIES = (0.5, 0.1, 0.01, 0.001, 0.0001)
TIERS = {s: f"s{s:g}" for s in SELECTIVITIES}


def catalogue(size: int) -> pd.DataFrame:
    frame = generate_large_catalogue(size)
    rng = np.random.default_rng(21)
    u = rng.random(size)
    tier = np.full(size, "rest", dtype=object)
    edge = 0.0
    for s, name in TIERS.items():
        tier[(u >= edge) & (u < edge + s)] = name
        edge += s
    frame["tier"] = tier
    frame["score"] = np.round(rng.random(size), 6)
    return frame


def big_bundle(out: Path, size: int) -> tuple[Path, dict[str, Any]]:
    bundle = out / f"bundle-{size}"
    record = out / f"bundle-{size}.build.json"
    if bundle.exists() and record.exists():
        return bundle, dict(json.loads(record.read_text()))
    frame = catalogue(size)
    print(f"building {size} titles into {bundle} (once)", flush=True)
    start = time.perf_counter()
    Matcher.build(frame, bundle, overwrite=True, show_progress=False).close()
    info = {"titles": size, "build_seconds": time.perf_counter() - start}
    record.write_text(json.dumps(info, indent=2) + "\n")
    return bundle, info


def sized(big: Path, size: int, out: Path, largest: int) -> Path:
    if size == largest:
        return big
    path = out / f"copy-{size}"
    if not path.exists():
        with Matcher.load(big, verify=False) as m:
            m.copy(path, limit=size, overwrite=True, show_progress=False).close()
    return path


def pct(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.median(values)), "p99": float(np.percentile(values, 99)), "n": len(values)}


def one_title_changes(m: Matcher, repeats: int) -> dict[str, Any]:
    """Seconds per change as the change reports them (written and published), and the wall time of the call,
    which adds the matcher's refresh onto the new generation (what a served reader pays to see it)."""
    seconds: dict[str, list[float]] = {"add": [], "upsert": [], "remove": []}
    wall: dict[str, list[float]] = {"add": [], "upsert": [], "remove": []}

    def timed(name: str, change: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        seconds[name].append(change(*args, **kwargs).seconds)
        wall[name].append(time.perf_counter() - start)

    for i in range(repeats):
        new_id = f"BENCH{i:05d}"
        row = {"id": [new_id], "title": ["acme teal kettle B123"], "brand": ["Acme"], "category": ["kitchen"]}
        row |= {"price": [12.5], "tier": ["rest"], "score": [0.5]}
        timed("add", m.add, pd.DataFrame(row), show_progress=False)
        row["title"] = ["acme teal kettle B124"]
        timed("upsert", m.upsert, pd.DataFrame(row), show_progress=False)
        timed("remove", m.remove, [new_id])
    return {name: pct(values) for name, values in seconds.items()} | {
        f"{name}_with_refresh": pct(values) for name, values in wall.items()
    }


def search_with_changes(m: Matcher, queries: list[str], changes: int, rounds: int = 3) -> dict[str, Any]:
    """Hybrid search latency before, after ``changes`` one-title adds (kept as a delta over the base files), and
    after compacting them into new base files (the adds removed again first): ``rounds`` passes over the queries
    each (a single pass right after a refresh or a compaction runs on cold caches: 12.5 ms against 10.0 here)."""

    def passes() -> dict[str, Any]:
        each = [_latencies(m, queries, None)["p50"] for _ in range(rounds)]
        return {"p50": float(np.median(each)), "passes": each}

    before = passes()
    for i in range(changes):
        row = {"id": [f"SEG{i:05d}"], "title": [f"acme teal kettle S{i}"], "brand": ["Acme"], "category": ["x"]}
        m.add(pd.DataFrame(row | {"price": [1.0], "tier": ["rest"], "score": [0.5]}), show_progress=False)
    with_delta = passes()
    m.remove([f"SEG{i:05d}" for i in range(changes)])
    compact = m.compact(show_progress=False).seconds
    compacted = passes()
    out = {"changes": changes, "before": before, "with_delta": with_delta, "compacted": compacted}
    return out | {"compact_s": compact, "ratio": with_delta["p50"] / compacted["p50"]}


def filters(m: Matcher, queries: list[str], sql_repeats: int) -> list[dict[str, Any]]:
    snap = m._snap
    store = snap.store
    vectors = snap.encode_queries(queries)
    rows: list[dict[str, Any]] = []
    unfiltered = _latencies(m, queries, None)
    for s in SELECTIVITIES:
        for kind, where in (("equality", {"tier": TIERS[s]}), ("range", {"score": {">=": 0.2, "<": 0.2 + s}})):
            start = time.perf_counter()
            allowed = store.filter_ids(where)
            columns_ms = 1000 * (time.perf_counter() - start)
            sql = []
            for _ in range(sql_repeats):
                start = time.perf_counter()
                by_sql = store.sql_filter_ids(where)
                sql.append(1000 * (time.perf_counter() - start))
            assert np.array_equal(allowed, by_sql), where
            latencies = _latencies(m, queries, where)
            hits = m.search_vectors(vectors, k=10, where=where, rerank=False)
            exact_scores, exact = exact_subset(vectors, store.vectors, allowed, 10)
            recall, tied = [], []
            for found, e, es in zip(hits, exact, exact_scores, strict=True):
                truth = {r.external_id for r in store.get(e[e >= 0].tolist())}
                got = {str(h.id) for h in found}
                recall.append(len(got & truth) / len(truth) if truth else float(not got))
                # titles repeat in this catalogue: a hit as close as the 10th exact one is as good as it (a tie)
                good = sum(h.dense_score is not None and h.dense_score >= es[len(truth) - 1] - 1e-6 for h in found)
                tied.append(min(good, len(truth)) / len(truth) if truth else float(not got))
            rows.append(
                {
                    "kind": kind,
                    "selectivity": s,
                    "passing": len(allowed),
                    "columns_ms": columns_ms,
                    "sql_ms": float(np.median(sql)),
                    "search": latencies,
                    "unfiltered": unfiltered,
                    "ratio_p50": latencies["p50"] / unfiltered["p50"],
                    "dense_recall_at_10": float(np.mean(recall)),
                    "dense_recall_at_10_ties": float(np.mean(tied)),
                }
            )
            print(
                f"  {kind:8s} {s:>7g}: {len(allowed):>7d} rows, columns {columns_ms:6.2f} ms, SQL "
                f"{np.median(sql):7.1f} ms, search p50 {latencies['p50']:6.2f} ms "
                f"(x{rows[-1]['ratio_p50']:.2f}), recall {rows[-1]['dense_recall_at_10']:.4f} "
                f"(ties counted {rows[-1]['dense_recall_at_10_ties']:.4f})",
                flush=True,
            )
    return rows


def _latencies(m: Matcher, queries: list[str], where: dict[str, Any] | None) -> dict[str, float]:
    for q in queries[:5]:
        m.search(q, k=10, where=where)
    ms = []
    for q in queries:
        start = time.perf_counter()
        m.search(q, k=10, where=where)
        ms.append(1000 * (time.perf_counter() - start))
    return pct(ms)


def bulk_add_and_compact(m: Matcher) -> dict[str, Any]:
    frame = catalogue(10_000)
    frame["id"] = [f"BULK{i:05d}" for i in range(len(frame))]
    start = time.perf_counter()
    m.encoder.encode_titles(frame["title"].tolist())
    encode = time.perf_counter() - start
    add = m.add(frame, show_progress=False).seconds
    remove = m.remove(frame["id"].tolist()).seconds
    compact = m.compact(show_progress=False).seconds
    return {"encode_10k_s": encode, "add_10k_s": add, "remove_10k_s": remove, "compact_s": compact}


def plot(result: dict[str, Any], out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (pip install matplotlib)")
        return False
    sizes = result["sizes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4))
    xs = [r["size"] for r in sizes]
    for name, colour in (("add", "C0"), ("upsert", "C1"), ("remove", "C2")):
        left.plot(
            xs, [1000 * r["changes"][name]["p50"] for r in sizes], color=colour, marker="o", label=f"one-title {name}"
        )
        if all(f"{name}_with_refresh" in r["changes"] for r in sizes):
            refresh = [1000 * r["changes"][f"{name}_with_refresh"]["p50"] for r in sizes]
            left.plot(xs, refresh, color=colour, linestyle="--", marker=".", label=f"{name} + the reader's refresh")
    left.axhline(150, color="grey", linestyle=":", label="issue #21: 150 ms")
    left.set(xlabel="titles", ylabel="p50 ms per change", xscale="log", yscale="log")
    largest = sizes[-1]
    for kind, style in (("equality", "-"), ("range", "--")):
        mine = [r for r in largest["filters"] if r["kind"] == kind]
        sel = [100 * r["selectivity"] for r in mine]
        right.plot(sel, [r["sql_ms"] for r in mine], style, marker="o", label=f"{kind}: SQL scan")
        right.plot(sel, [r["columns_ms"] for r in mine], style, marker="s", label=f"{kind}: columns")
        right.plot(sel, [r["search"]["p50"] for r in mine], style, marker="^", label=f"{kind}: filtered search")
    right.axhline(largest["filters"][0]["unfiltered"]["p50"], color="grey", linestyle=":", label="unfiltered search")
    right.set(xlabel="titles passing, %", ylabel="ms (p50)", xscale="log", yscale="log")
    right.set_title(f"{largest['size']:,} titles", fontsize=10)
    left.legend(fontsize=7)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sql-repeats", type=int, default=3)
    parser.add_argument("--segments", type=int, default=100, help="one-title changes before the search comparison")
    parser.add_argument(
        "--segments-only", action="store_true", help="only the search comparison (JSON: --json, e.g. another file)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "changes")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "bench_changes.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    largest = max(args.sizes)
    big, built = big_bundle(args.out, largest)
    queries = generate_queries(args.queries, seed=7)
    result: dict[str, Any] = {"machine": platform.platform(), "build": built, "sizes": []}
    for size in sorted(args.sizes):
        path = sized(big, size, args.out, largest)
        print(f"{size} titles ({path})", flush=True)
        with Matcher.load(path, verify=False) as m:
            if args.segments_only:
                entry: dict[str, Any] = {"size": size, "segments": search_with_changes(m, queries, args.segments)}
                print(f"  search after {args.segments} changes: {entry['segments']}", flush=True)
                result["sizes"].append(entry)
                continue
            entry = {"size": size, "filters": filters(m, queries, args.sql_repeats)}
            entry["changes"] = one_title_changes(m, args.repeats)
            print("  changes: " + ", ".join(f"{k} p50 {1000 * v['p50']:.0f} ms" for k, v in entry["changes"].items()))
            if size == largest and args.segments:
                entry["segments"] = search_with_changes(m, queries, args.segments)
                print(f"  search after {args.segments} changes: {entry['segments']}", flush=True)
            if size == largest:
                entry["bulk"] = bulk_add_and_compact(m)
                print("  " + ", ".join(f"{k} {v:.1f}" for k, v in entry["bulk"].items()), flush=True)
            result["sizes"].append(entry)
        if size != largest:
            shutil.rmtree(path, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    if not args.segments_only and plot(result, args.json.with_suffix(".png")):
        print(f"wrote {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
