"""Normal searches beside hostile reads (issue #22): does the token budget and the deadline keep p99 near quiet?

    nice -n 5 .venv/bin/python scripts/bench_hostile.py                 # 3,000 titles, 3 phases of 25 s
    nice -n 5 .venv/bin/python scripts/bench_hostile.py --seconds 60 --size 20000

One `matching serve` (1 worker, torch on 1 thread, the default encoder all-MiniLM-L6-v2) on the loopback; a bundle
of generated titles, built once under results/hostile/. Phases, one after another, each `--seconds` long:
1. quiet: `--clients` closed-loop clients send GET /search (a generated query, k=10);
2. busy (the control): the same, while `--hostile` other processes send normal searches as fast: what as many
   more well-behaved clients cost;
3. hostile: the same, while the `--hostile` processes send, in turn, the biggest /score the body bound lets
   through (1,900 pairs of distinct 2,000-character texts, ~7.7 MB) and a POST /search of 256 distinct
   2,000-character queries: the budget refuses both (413) after counting a slice of their tokens;
4. at budget: the same, with the hostile processes sending what the budget lets through: 32 distinct
   2,000-character queries (32 x 256 = 8,192 tokens, ~1.6 s of encoding each).
Prints a table (p50/p99 of the normal searches, the CPU the server and the other processes used, their answers by
status) and the ratio of each p99 to the quiet one (target: <= 2 for phase 3); writes JSON to
results/bench_hostile.json. Every process shares this machine's cores: the other processes' CPU is the server's
loss, and so is any other load (the load average is printed).
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
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from load_test import free_port, pct, serve  # noqa: E402

from matching.demo import generate_large_catalogue, generate_queries  # noqa: E402

WORDS = [
    "stainless",
    "steel",
    "bottle",
    "wireless",
    "charger",
    "cable",
    "leather",
    "wallet",
    "running",
    "shoes",
    "espresso",
    "machine",
    "lamp",
]


def long_text(rng: random.Random, chars: int = 2000) -> str:
    """A distinct text of ``chars`` characters of real words: ~400 tokens, cut at 256 by the encoder."""
    words = [str(rng.randrange(10**9))]
    while sum(map(len, words)) + len(words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:chars]


def hostile_bodies(kind: str, seed: int) -> list[tuple[str, bytes]]:
    """The (path, body) a hostile client sends in turn (GET when the body is empty); ``refused-search``: only the
    256 long queries, ``refused-score``: only the biggest /score."""
    rng = random.Random(seed)
    if kind == "normal":  # the control: as many more clients, sending normal searches
        return [("/search?" + urllib.parse.urlencode({"q": q, "k": 10}), b"") for q in generate_queries(500, seed)]
    if kind.startswith("refused"):
        pairs = [{"query": long_text(rng), "title": long_text(rng)} for _ in range(1900)]
        queries = [long_text(rng) for _ in range(256)]
        both = [
            ("/score", json.dumps({"pairs": pairs}).encode()),
            ("/search", json.dumps({"queries": queries}).encode()),
        ]
        return both if kind == "refused" else [b for b in both if b[0] == "/" + kind.split("-")[1]]
    return [("/search", json.dumps({"queries": [long_text(rng) for _ in range(32)]}).encode())]


def hostile_child(port: int, kind: str, seconds: float, seed: int) -> None:
    """One hostile client, in its own process (its JSON and sockets cost the normal clients nothing)."""
    bodies = hostile_bodies(kind, seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    statuses: Counter[int] = Counter()
    lat: list[float] = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        path, body = bodies[i % len(bodies)]
        i += 1
        start = time.perf_counter()
        try:
            if body:
                conn.request("POST", path, body, {"content-type": "application/json"})
            else:
                conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            statuses[r.status] += 1
            lat.append((time.perf_counter() - start) * 1000)
        except (OSError, http.client.HTTPException):
            statuses[0] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    cpu = os.times()
    print(
        json.dumps({"statuses": {str(k): v for k, v in statuses.items()}, "cpu_s": cpu.user + cpu.system, **pct(lat)})
    )


def normal_client(port: int, queries: list[str], end: float, out: dict[str, Any], seed: int) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    lat: list[float] = []
    errors: Counter[int] = Counter()
    while time.monotonic() < end:
        start = time.perf_counter()
        try:
            conn.request("GET", "/search?" + urllib.parse.urlencode({"q": rng.choice(queries), "k": 10}))
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                lat.append((time.perf_counter() - start) * 1000)
            else:
                errors[r.status] += 1
        except (OSError, http.client.HTTPException):
            errors[0] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out.update(lat=lat, errors=errors)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase(port: int, name: str, args: argparse.Namespace, server: int) -> dict[str, Any]:
    queries = generate_queries(2000, seed=7)
    children = []
    if name != "quiet":
        kind = {"busy": "normal", "hostile": "refused"}.get(name, name)
        kind = {"hostile_search": "refused-search", "hostile_score": "refused-score"}.get(kind, kind)
        for i in range(args.hostile):
            cmd = [sys.executable, __file__, "--hostile-child", str(port), kind, str(args.seconds + 1), str(i)]
            children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        time.sleep(3.0)  # the children build their bodies (a few seconds) and start sending
    end = time.monotonic() + args.seconds
    server_cpu = cpu_seconds(server)
    results: list[dict[str, Any]] = [{} for _ in range(args.clients)]
    threads = [
        threading.Thread(target=normal_client, args=(port, queries, end, results[i], i)) for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server_cpu = cpu_seconds(server) - server_cpu
    hostile: Counter[str] = Counter()
    hostile_cpu = 0.0
    for child in children:
        out, _ = child.communicate(timeout=120)
        report = json.loads(out.strip().splitlines()[-1])
        hostile.update(report["statuses"])
        hostile_cpu += report["cpu_s"]
    lat = [x for r in results for x in r["lat"]]
    errors: Counter[int] = sum((r["errors"] for r in results), Counter())
    return {
        "phase": name,
        "searches": len(lat),
        "search_errors": dict(errors),
        "rps": len(lat) / args.seconds,
        **pct(lat),
        "hostile_statuses": dict(hostile),
        "server_cpu_share": server_cpu / args.seconds,  # cores the server used
        "hostile_clients_cpu_share": hostile_cpu / (args.seconds + 1),  # cores the hostile processes used
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hostile-child":
        hostile_child(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=3000, help="generated titles in the bundle")
    parser.add_argument("--clients", type=int, default=4, help="normal clients (closed loop)")
    parser.add_argument("--hostile", type=int, default=2, help="hostile client processes")
    parser.add_argument("--seconds", type=float, default=25)
    parser.add_argument(
        "--phases",
        default="quiet,busy,hostile,at_budget",
        help="comma-separated, quiet first; also hostile_search, hostile_score (one kind of refused request alone)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_hostile.json")
    args = parser.parse_args()

    from matching import Matcher

    bundle = ROOT / "results" / "hostile" / f"bundle-{args.size}"
    if not (bundle / "CURRENT").exists():
        bundle.parent.mkdir(parents=True, exist_ok=True)
        Matcher.build(generate_large_catalogue(args.size), bundle, overwrite=True, show_progress=False).close()
    load = os.getloadavg()
    port = free_port()
    server = serve(bundle, port, "--log-level", "warning")
    try:
        runs = []
        for name in args.phases.split(","):
            print(f"{name}: {args.clients} clients x {args.seconds:.0f} s ...", flush=True)
            runs.append(phase(port, name, args, server.pid))
    finally:
        server.terminate()
        server.wait(60)
    quiet = runs[0]["p99"]
    for r in runs:
        r["p99_over_quiet"] = r["p99"] / quiet
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "titles": args.size,
        "clients": args.clients,
        "hostile_processes": args.hostile,
        "seconds": args.seconds,
        "load_average_before": load[0],
        "runs": runs,
    }
    print(f"\n{args.size} titles, 1 worker, torch on 1 thread, {args.clients} normal clients, {args.hostile} hostile")
    print(
        f"{'phase':<10} {'searches':>8} {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'p99/quiet':>9} "
        f"{'server cores':>12} {'hostile cores':>13}  hostile answers"
    )
    for r in runs:
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(r["hostile_statuses"].items())) or "-"
        print(
            f"{r['phase']:<10} {r['searches']:>8} {r['rps']:>6.1f} {r['p50']:>7.1f} {r['p99']:>7.1f} "
            f"{r['p99_over_quiet']:>9.2f} {r['server_cpu_share']:>12.2f} {r['hostile_clients_cpu_share']:>13.2f}  "
            f"{answers}"
        )
    print(f"load average before: {load[0]:.1f} (other processes on this machine count against every phase)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
