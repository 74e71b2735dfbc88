"""Micro-batched serving against each read searched alone (issue #23), side by side in one run.

    nice -n 5 .venv/bin/python scripts/bench_serving.py                       # 100k titles, 1/4/16/32 clients x 20 s
    nice -n 5 .venv/bin/python scripts/bench_serving.py --clients 16 --seconds 60

One `matching serve` (1 worker, torch on 1 thread, the default encoder) on the loopback per mode: batching on
(`--batch-wait-ms`, default 2) with each of `--batch-threads` (default 1 and 2), then off (`--batch-wait-ms 0`).
For each client count, closed-loop clients send
GET /search (a generated query, k=10) for `--seconds` (after 2 s of warm-up), while another process publishes a
change every 5 s, as scripts/load_test.py does (the issue's 94 req/s, p99 353 ms). The 100k-title bundle is
scripts/load_test.py's (results/load/bundle-100000, built once and reused). The first answer each mode gave for
each query is kept, and each batching mode's answers compared with those searched alone: same ids in the same
order, and the largest score difference. Prints a table, writes results/bench_serving.json and, with
matplotlib, results/bench_serving.png (req/s and p99 against clients; BENCHMARKS.md shows the copy in
scripts/plots/).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from load_test import free_port, make_bundle, pct, serve  # noqa: E402

from matching.demo import generate_queries  # noqa: E402

# the children run this checkout's matching, and nothing else put on this script's path (a matplotlib elsewhere)
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def client(port: int, queries: list[str], start: float, end: float, out: dict[str, Any], seed: int) -> None:
    """Closed loop until ``end``; latencies counted from ``start`` (before it: warm-up)."""
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    lat: list[float] = []
    errors: list[str] = []
    answers: dict[str, list[tuple[str, float]]] = {}
    while time.monotonic() < end:
        q = rng.choice(queries)
        began = time.perf_counter()
        try:
            conn.request("GET", "/search?" + urllib.parse.urlencode({"q": q, "k": 10}))
            r = conn.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        took = (time.perf_counter() - began) * 1000
        if r.status != 200:
            errors.append(f"{r.status}: {body[:200]!r}")
            continue
        answers.setdefault(q, [(h["id"], h["score"]) for h in json.loads(body)["hits"]])
        if time.monotonic() >= start:
            lat.append(took)
    out.update(lat=lat, errors=errors, answers=answers)


def phase(port: int, clients: int, seconds: float, queries: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    start = time.monotonic() + 2.0
    end = start + seconds
    results: list[dict[str, Any]] = [{} for _ in range(clients)]
    threads = [threading.Thread(target=client, args=(port, queries, start, end, results[i], i)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = [x for r in results for x in r["lat"]]
    errors = [x for r in results for x in r["errors"]]
    answers: dict[str, Any] = {}
    for r in results:
        answers.update(r["answers"])
    row = {"clients": clients, "requests": len(lat), "errors": len(errors), "error_examples": errors[:3]}
    return {**row, "rps": len(lat) / seconds, **pct(lat)}, answers


def batch_counts(port: int) -> tuple[int, int]:
    """The server's micro-batches and the queries in them, so far (from /metrics)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    lines = conn.getresponse().read().decode().splitlines()
    value = {ln.split()[0]: int(ln.split()[1]) for ln in lines if ln.startswith("matching_batch")}
    return value["matching_batches_total"], value["matching_batched_queries_total"]


def compare(off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """Both modes' answers to the queries both saw: same ids in order, and the largest score difference."""
    common = sorted(set(off) & set(on))
    same = [q for q in common if [i for i, _ in off[q]] == [i for i, _ in on[q]]]
    diff = max((abs(a - b) for q in same for (_, a), (_, b) in zip(off[q], on[q], strict=True)), default=0.0)
    return {"queries": len(common), "same_ids_in_order": len(same), "max_score_diff": diff}


def mode(
    template: Path, work: Path, wait_ms: float, threads: int, counts: list[int], seconds: float
) -> tuple[list[Any], Any]:
    bundle = work / "served-batching"  # a fresh copy: the publisher changes it
    subprocess.run(["rm", "-rf", str(bundle)], check=True)
    subprocess.run(["cp", "-r", str(template), str(bundle)], check=True)
    queries = generate_queries(5000, seed=7)
    port = free_port()
    options = ["--torch-threads", "1", "--batch-wait-ms", str(wait_ms), "--batch-threads", str(threads)]
    server = serve(bundle, port, *options, cwd=ROOT, env=ENV)
    total = len(counts) * (seconds + 2) + 5
    publisher = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "load_test.py"), "--publish-child", str(bundle), str(total), "5"],
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
        env=ENV,
    )
    rows, answers = [], {}
    try:
        for n in counts:
            print(f"  batching {'off' if wait_ms == 0 else f'{wait_ms:g} ms'}, {n} clients ...", flush=True)
            before = batch_counts(port)
            row, seen = phase(port, n, seconds, queries)
            batches, items = (a - b for a, b in zip(batch_counts(port), before, strict=True))
            mean = items / batches if batches else None
            rows.append({"batch_wait_ms": wait_ms, "batch_threads": threads, **row, "mean_batch": mean})
            answers.update({q: a for q, a in seen.items() if q not in answers})
    finally:
        publisher.kill()
        server.terminate()
        server.wait(60)
        subprocess.run(["rm", "-rf", str(bundle)], check=True)
    return rows, answers


def plot(rows: list[dict[str, Any]], out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (pip install matplotlib)")
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    modes = sorted({(r["batch_wait_ms"] > 0, r["batch_threads"]) for r in rows})
    for batched, threads in modes:
        mine = [r for r in rows if (r["batch_wait_ms"] > 0, r["batch_threads"]) == (batched, threads)]
        label = f"micro-batched, {threads} batch thread{'s' if threads > 1 else ''}" if batched else "each read alone"
        xs = [r["clients"] for r in mine]
        left.plot(xs, [r["rps"] for r in mine], marker="o", label=label)
        right.plot(xs, [r["p99"] for r in mine], marker="o", label=label)
    left.axhline(94, color="grey", linestyle=":", label="issue #23: 94 req/s")
    right.axhline(353, color="grey", linestyle=":", label="issue #23: p99 353 ms")
    left.set(xlabel="closed-loop clients", ylabel="requests / s", xscale="log", xticks=[1, 4, 16, 32])
    right.set(xlabel="closed-loop clients", ylabel="p99 latency, ms", xscale="log", xticks=[1, 4, 16, 32])
    for ax in (left, right):
        ax.set_xticklabels(["1", "4", "16", "32"])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("GET /search, 100k titles, 1 server process, torch on 1 thread")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--batch-threads", type=int, nargs="+", default=[1, 2], help="one batching run for each")
    parser.add_argument("--only-on", action="store_true", help="skip the runs with batching off (trying settings)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_serving.json")
    args = parser.parse_args()

    work = ROOT / "results" / "load"
    work.mkdir(parents=True, exist_ok=True)
    template = work / f"bundle-{args.size}"
    make_bundle(template, args.size)
    load = os.getloadavg()[0]
    on, answers = [], []
    for threads in args.batch_threads:
        rows_on, seen = mode(template, work, args.batch_wait_ms, threads, args.clients, args.seconds)
        on += rows_on
        answers.append(seen)
    off, off_answers = ([], {}) if args.only_on else mode(template, work, 0.0, 1, args.clients, args.seconds)
    rows = off + on
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "titles": args.size,
        "seconds": args.seconds,
        "load_average_before": load,
        "rows": rows,
        "answers": {t: compare(off_answers, seen) for t, seen in zip(args.batch_threads, answers, strict=True)},
    }
    print(f"\n{args.size} titles, 1 worker, torch threads 1, loopback, {args.seconds:g} s a phase")
    print(
        f"{'batching':<9} {'clients':>7} {'requests':>9} {'errors':>6} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'x off':>6} {'batch':>6}"
    )
    for r in rows:
        base = next((o for o in off if o["clients"] == r["clients"]), r)
        label = "off" if r["batch_wait_ms"] == 0 else f"{r['batch_wait_ms']:g} ms x{r['batch_threads']}"
        print(
            f"{label:<9} {r['clients']:>7} {r['requests']:>9} {r['errors']:>6} {r['rps']:>7.1f} {r['p50']:>8.1f} "
            f"{r['p99']:>8.1f} {r['rps'] / base['rps']:>6.2f} {r['mean_batch'] or 0:>6.1f}"
        )
    for threads, a in report["answers"].items():
        print(
            f"answers, {threads} batch thread(s): {a['same_ids_in_order']} of {a['queries']} queries seen with and "
            f"without batching: same ids in the same order; largest score difference among those "
            f"{a['max_score_diff']:.2g}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    if plot(rows, args.out.with_suffix(".png")):
        print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
