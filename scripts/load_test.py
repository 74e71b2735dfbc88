"""Load test of `matching serve` (issue #12), on the loopback only, every loop bounded in time.

    .venv/bin/python scripts/load_test.py                      # 100k-title bundle, 16 clients x 60 s, quiet and busy
    .venv/bin/python scripts/load_test.py --seconds 20 --workers 2

Runs, one after another (never two benchmarks at once on this 2-core machine):
1. diagnosis, in-process: single-search latency with torch on 2 threads and on 1, quiet and beside a CPU-bound
   process (a torch matmul loop on its default threads);
2. the service, quiet: 16 clients in closed loop for 60 s while another process publishes a change every 5 s;
3. the same beside the CPU-bound process;
4. visibility: seconds from `matching add` in another process to the title being found through the server.
The 100k bundle is made once from the first 100k titles of the 1M scale bundle (scripts/bench_scale.py) when
that exists, without re-encoding; otherwise from a generated catalogue. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from matching.demo import generate_large_catalogue, generate_queries  # noqa: E402

HOG = "import torch\na = torch.randn(1000, 1000)\nwhile True:\n    a @ a\n"
SCALE = ROOT / "results" / "scale" / "bundle-1000000"


def pct(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    if not s:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"p50": s[len(s) // 2], "p99": s[min(len(s) - 1, int(len(s) * 0.99))], "max": s[-1]}


def make_bundle(out: Path, size: int) -> None:
    from matching import Matcher

    if (out / "CURRENT").exists():
        return
    if SCALE.exists():
        with Matcher.load(SCALE, verify=False) as src:
            src.copy(out, limit=size, overwrite=True, show_progress=False)
    else:
        Matcher.build(generate_large_catalogue(size), out, overwrite=True).close()


def hog() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", HOG])


# -- 1. diagnosis ------------------------------------------------------------------------------------


def diagnose_child(bundle: Path, threads: int, busy: bool, n: int) -> dict[str, Any]:
    import torch

    from matching import Matcher

    torch.set_num_threads(threads)
    queries = generate_queries(n + 20, seed=3)
    with Matcher.load(bundle, verify=False) as m:
        for q in queries[:20]:
            m.search(q)
        neighbour = hog() if busy else None
        time.sleep(1.0)
        lat = []
        for q in queries[20:]:
            start = time.perf_counter()
            m.search(q)
            lat.append((time.perf_counter() - start) * 1000)
        if neighbour:
            neighbour.kill()
    return {"torch_threads": threads, "busy": busy, "searches": n, **pct(lat)}


def diagnose(bundle: Path, n: int) -> list[dict[str, Any]]:
    rows = []
    for busy in (False, True):
        for threads in (2, 1):
            cmd = [sys.executable, __file__, "--diagnose-child", str(bundle), str(threads), str(int(busy)), str(n)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(
                f"  in-process search, torch threads {threads}, {'busy' if busy else 'quiet'}: "
                f"p50 {rows[-1]['p50']:.1f} ms, p99 {rows[-1]['p99']:.1f} ms",
                flush=True,
            )
    return rows


# -- 2/3. the service -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen[str], port: int) -> subprocess.Popen[str]:
    """``proc`` (a `matching serve` on ``port``) once its /ready answers 200; exits when it dies or takes 180 s."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready in 180 s")


def serve(bundle: Path, port: int, *options: str, **popen: Any) -> subprocess.Popen[str]:
    """`matching serve BUNDLE --port PORT OPTIONS...` in a child process, once it answers /ready."""
    cmd = [sys.executable, "-m", "matching", "serve", str(bundle), "--port", str(port), *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
    return wait_ready(proc, port)


def publish_child(bundle: Path, seconds: float, every: float) -> None:
    """Another process changing the catalogue: one new title every ``every`` seconds."""
    import pandas as pd

    from matching import Matcher

    with Matcher.load(bundle, verify=False) as m:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            tag = f"{os.getpid()}-{i}"
            m.add(pd.DataFrame([{"id": f"load-{tag}", "title": f"load test gadget {tag}"}]), show_progress=False)
            i += 1
            time.sleep(every)
    print(json.dumps({"published": i}))


def client(port: int, queries: list[str], end: float, out: dict[str, Any], seed: int) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    lat: list[float] = []
    errors: list[str] = []
    generations: set[str] = set()
    while time.monotonic() < end:
        q = rng.choice(queries)
        start = time.perf_counter()
        try:
            conn.request("GET", "/search?" + urllib.parse.urlencode({"q": q, "k": 10}))
            r = conn.getresponse()
            body = r.read()
            took = (time.perf_counter() - start) * 1000
            if r.status != 200:
                errors.append(f"{r.status}: {body[:200]!r}")
                continue
            data = json.loads(body)
            if len(data["hits"]) != 10:
                errors.append(f"{len(data['hits'])} hits")
            generations.add(data["generation"])
            lat.append(took)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out.update(lat=lat, errors=errors, generations=generations)


def load(port: int, bundle: Path, clients: int, seconds: float, busy: bool) -> dict[str, Any]:
    queries = generate_queries(5000, seed=7)
    publisher = subprocess.Popen(
        [sys.executable, __file__, "--publish-child", str(bundle), str(seconds), "5"], stdout=subprocess.PIPE, text=True
    )
    neighbour = hog() if busy else None
    time.sleep(1.0)
    end = time.monotonic() + seconds
    results: list[dict[str, Any]] = [{} for _ in range(clients)]
    threads = [threading.Thread(target=client, args=(port, queries, end, results[i], i)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if neighbour:
        neighbour.kill()
    out, _ = publisher.communicate(timeout=120)
    lat = [x for r in results for x in r["lat"]]
    errors = [x for r in results for x in r["errors"]]
    generations = set().union(*(r["generations"] for r in results))
    return {
        "busy": busy,
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": len(lat) + len(errors),
        "errors": len(errors),
        "error_examples": errors[:5],
        "rps": len(lat) / wall,
        **pct(lat),
        "generations_seen": len(generations),
        "published": json.loads(out.strip().splitlines()[-1])["published"],
    }


def visibility(port: int, bundle: Path, tmp: Path) -> dict[str, float]:
    csv = tmp / "visible.csv"
    title = f"visibility probe {random.randrange(10**9)}"
    csv.write_text(f"id,title\nprobe-{title.split()[-1]},{title}\n", encoding="utf-8")
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "matching", "add", str(bundle), str(csv), "-q"], check=True)
    added = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.monotonic() - added < 30:
        conn.request("GET", "/search?" + urllib.parse.urlencode({"q": title, "k": 1, "retrieval": "lexical"}))
        hits = json.loads(conn.getresponse().read())["hits"]
        if hits and hits[0]["title"] == title:
            found = time.monotonic()
            return {"add_seconds": added - start, "visible_after_add_seconds": found - added}
        time.sleep(0.05)
    return {"add_seconds": added - start, "visible_after_add_seconds": float("inf")}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--diagnose-child":
        bundle, threads, busy, n = sys.argv[2:6]
        print(json.dumps(diagnose_child(Path(bundle), int(threads), busy == "1", int(n))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--publish-child":
        publish_child(Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--searches", type=int, default=300, help="searches per diagnosis cell")
    parser.add_argument("--skip-diagnosis", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "load_test.json")
    args = parser.parse_args()

    work = ROOT / "results" / "load"
    work.mkdir(parents=True, exist_ok=True)
    template = work / f"bundle-{args.size}"
    make_bundle(template, args.size)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    report: dict[str, Any] = {"machine": machine, "titles": args.size, "workers": args.workers}
    report["torch_threads"] = args.torch_threads
    if not args.skip_diagnosis:
        print("diagnosis (in-process single searches):", flush=True)
        report["diagnosis"] = diagnose(template, args.searches)
    token = work / "token"
    token.write_text("load-test-token-0123456789\n", encoding="utf-8")  # 16 or more characters
    token.chmod(0o600)
    runs = []
    for busy in (False, True):
        bundle = work / f"served-{'busy' if busy else 'quiet'}"  # a fresh copy: the publisher changes it
        subprocess.run(["rm", "-rf", str(bundle)], check=True)
        subprocess.run(["cp", "-r", str(template), str(bundle)], check=True)
        port = free_port()
        options = ["--workers", str(args.workers), "--torch-threads", str(args.torch_threads)]
        server = serve(bundle, port, *options, "--token-file", str(token))
        try:
            print(
                f"service, {'busy' if busy else 'quiet'}: {args.clients} clients x {args.seconds:.0f} s ...", flush=True
            )
            runs.append(load(port, bundle, args.clients, args.seconds, busy))
            if not busy:
                report["visibility"] = visibility(port, bundle, work)
        finally:
            server.terminate()
            server.wait(60)
        subprocess.run(["rm", "-rf", str(bundle)], check=True)
    report["service"] = runs

    print(f"\n{args.size} titles, {args.workers} worker(s), torch threads {args.torch_threads}, loopback")
    print(
        f"{'run':<8} {'clients':>7} {'requests':>9} {'errors':>6} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'gens':>5}"
    )
    for r in runs:
        run = "busy" if r["busy"] else "quiet"
        print(
            f"{run:<8} {r['clients']:>7} {r['requests']:>9} {r['errors']:>6} {r['rps']:>7.1f} "
            f"{r['p50']:>8.1f} {r['p99']:>8.1f} {r['max']:>8.1f} {r['generations_seen']:>5}"
        )
    if "visibility" in report:
        v = report["visibility"]
        print(
            f"visibility: `matching add` took {v['add_seconds']:.2f} s; "
            f"findable {v['visible_after_add_seconds']:.2f} s after it returned"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
