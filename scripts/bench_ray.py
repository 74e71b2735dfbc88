"""Ray build vs local build of the 1M-title generated catalogue (issue #13), side by side in one run.

    .venv/bin/python scripts/bench_ray.py                 # 1M titles (about 25 minutes on 2 cores)
    .venv/bin/python scripts/bench_ray.py --size 20000    # a quick look
    .venv/bin/python scripts/bench_ray.py --engines local # the local build alone (issue #23: wall / read+encode)
    .venv/bin/python scripts/bench_ray.py --pairs 2       # Ray then local, then local then Ray: the median overhead

Each build is `matching build CSV --out B [--engine ray [--encoders N]]` in a fresh process (without
`--encoders`, the library's default: one one-thread actor per CPU, no GPU). Peak memory is the
largest sum of RSS over the build process and all its descendants (Ray's GCS, raylet and workers included),
sampled every 0.5 s. Afterwards both bundles are compared: the same ids and titles in the same rows, and the
largest difference between their stored vectors. Prints a table and writes JSON (results/bench_ray.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from matching.demo import generate_large_catalogue  # noqa: E402
from matching.matcher import Matcher  # noqa: E402


def tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and all its descendants (from /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(stat[1])
            rss[int(entry.name)] = int(stat[21]) * 4096
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(pid, 0) for pid in tree)


def timed_build(cmd: list[str]) -> dict[str, Any]:
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"build failed ({proc.returncode})")
    return {"command": " ".join(cmd), "wall_seconds": wall, "peak_rss_mb": peak / 2**20}


def one_pair(csv: Path, work: Path, engines: list[str], encoders: int | None, size: int) -> dict[str, Any]:
    """Build ``csv`` with each of ``engines`` (in that order, each a fresh process), compare, print a table."""
    runs: dict[str, dict[str, Any]] = {}
    base = [sys.executable, "-m", "matching", "build", str(csv), "--overwrite", "-q"]
    for engine in engines:
        if engine == "ray":
            runs["ray"] = timed_build(
                [*base, "--out", str(work / "bundle-ray"), "--engine", "ray"]
                + (["--encoders", str(encoders)] if encoders else [])
            )
        else:
            runs["local"] = timed_build([*base, "--out", str(work / "bundle-local")])
    for name in runs:
        with Matcher.load(work / f"bundle-{name}", verify=False) as m:
            runs[name]["build_record"] = m.manifest.source.get("build")
            seconds = (runs[name]["build_record"] or {}).get("seconds", {})
            runs[name]["wall_over_read_and_encode"] = runs[name]["wall_seconds"] / seconds["read_and_encode"]
    report: dict[str, Any] = {"titles": size, "runs": runs}
    if len(runs) == 2:
        with (
            Matcher.load(work / "bundle-local", verify=False) as a,
            Matcher.load(work / "bundle-ray", verify=False) as b,
        ):
            same_rows = a.catalogue().equals(b.catalogue())
            diff = float(np.abs(a.store.vectors - b.store.vectors).max())
        report |= {
            "same_ids_titles_metadata": same_rows,
            "max_vector_difference": diff,
            "ray_overhead": runs["ray"]["wall_seconds"] / runs["local"]["wall_seconds"] - 1,
            "ray_rss_ratio": runs["ray"]["peak_rss_mb"] / runs["local"]["peak_rss_mb"],
            "per_actor_titles_per_second": (runs["ray"]["build_record"] or {}).get("titles_per_second"),
        }
    print(f"\n{size} titles, CSV -> bundle, this machine")
    print(
        f"{'engine':<8} {'wall s':>8} {'peak RSS MB':>12} {'read+encode s':>14} {'index s':>8} {'BM25 s':>7} "
        f"{'wall / read+encode':>19}"
    )
    for name, r in runs.items():
        sec = (r["build_record"] or {}).get("seconds", {})
        print(
            f"{name:<8} {r['wall_seconds']:>8.1f} {r['peak_rss_mb']:>12.0f} {sec.get('read_and_encode', 0):>14.1f} "
            f"{sec.get('index', 0):>8.1f} {sec.get('lexical', 0):>7.1f} {r['wall_over_read_and_encode']:>19.3f}"
        )
    if len(runs) == 2:
        ray_record = runs["ray"]["build_record"] or {}
        print(
            f"ray overhead {report['ray_overhead']:+.1%}, RSS x{report['ray_rss_ratio']:.2f}; "
            f"per-actor titles/s {report['per_actor_titles_per_second']}; "
            f"first encode after {ray_record.get('first_encode_after_seconds')} s, "
            f"actor encode {ray_record.get('actor_encode_seconds')} s; "
            f"same rows {report['same_ids_titles_metadata']}, "
            f"max vector difference {report['max_vector_difference']:.2e}"
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--encoders", type=int, default=None, help="default: the library's")
    parser.add_argument("--engines", nargs="+", choices=["ray", "local"], default=["ray", "local"])
    parser.add_argument("--pairs", type=int, default=1, help="build each engine this many times, alternating")
    parser.add_argument("--out", type=Path, default=None, help="default results/bench_ray[_local].json")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}")
    if args.encoders is not None and args.encoders < 1:  # 0 was taken for "the default" without a word
        parser.error(f"--encoders must be at least 1, got {args.encoders}")
    work = ROOT / "results" / "ray"
    work.mkdir(parents=True, exist_ok=True)
    csv = ROOT / "results" / "scale" / f"catalogue-{args.size}.csv"
    if not csv.exists():
        csv = work / f"catalogue-{args.size}.csv"
        if not csv.exists():
            generate_large_catalogue(args.size).to_csv(csv, index=False)
    pairs = []
    for k in range(args.pairs):
        # the order swaps from pair to pair: the machine's speed drifts over a run, and either build may be first
        engines = args.engines if k % 2 == 0 else list(reversed(args.engines))
        pairs.append(one_pair(csv, work, engines, args.encoders, args.size))
    report = pairs[0] if args.pairs == 1 else {"titles": args.size, "pairs": pairs}
    if args.pairs > 1 and len(args.engines) == 2:
        overheads = [p["ray_overhead"] for p in pairs]
        report["ray_overhead_per_pair"] = overheads
        report["ray_overhead_median"] = float(np.median(overheads))
        print(
            f"\nray overhead per pair {', '.join(f'{o:+.1%}' for o in overheads)}; median {np.median(overheads):+.1%}"
        )
    out = args.out or ROOT / "results" / (
        "bench_ray.json" if len(args.engines) == 2 else f"bench_ray_{args.engines[0]}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
