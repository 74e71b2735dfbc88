"""Encoding throughput of `Encoder.encode` against the code before, side by side (issue #23: >= 1.3x on short titles).

    git worktree add /tmp/base <commit before>   # the baseline's code
    .venv/bin/python scripts/bench_encode.py --baseline /tmp/base
    .venv/bin/python scripts/bench_encode.py --baseline /tmp/base --sets titles --titles 20000 --rounds 2

Each set is encoded by a fresh process per tree (this checkout and `--baseline`), the trees alternating for
`--rounds` rounds, each process warming up on the first 500 texts and then timing `--passes` passes of
`Encoder.encode` over the whole set (`default` preset, the encoder's batch size); a tree's figure is the median of
its passes. Sets: `titles` (generated product titles, ~14 tokens), `lengths` (generated titles cut or repeated to
8, 16, 32, 64, 128 and 256 tokens: throughput against text length), `lcqmc` and `scifact` (questions and abstracts
from ../shared/data where present). The `exact` preset's vectors (this checkout) give each tree's cosine floor.
Prints a table and writes JSON (results/bench_encode.json) and, with matplotlib, the length curve
(scripts/plots/bench_encode.png).

`--stand-in-ms 0 1 3` (no GPU here): the model is replaced by a stand-in device that takes that many ms a batch
(a sleep, which frees the CPU as a GPU would) and the generated titles are encoded with the host steps serial and
pipelined (`Encoder.pipelined`: tokenising, sorting and padding on a worker thread ahead of the device), in this
process, the two alternating: how fast the encode loop can feed a device of that speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasets import DATA, write_json  # noqa: E402

LENGTHS = (8, 16, 32, 64, 128, 256)

WORKER = """
import json, sys, time
import numpy as np
from matching.config import EncoderConfig
from matching.encoder import Encoder
texts = json.load(open(sys.argv[1]))
encoder = Encoder.from_pretrained(EncoderConfig(preset=sys.argv[3]))
encoder.encode(texts[:500])
rates = []
for _ in range(int(sys.argv[4])):
    start = time.perf_counter()
    vectors = encoder.encode(texts)
    rates.append(len(texts) / (time.perf_counter() - start))
np.save(sys.argv[2], vectors)
import matching
print(json.dumps({"rates": rates, "plan": encoder.plan.describe(), "code": matching.__file__}))
"""


def texts_for(name: str, size: int) -> dict[str, list[str]]:
    """The set's texts by label (one label, or one per length for ``lengths``)."""
    from matching.demo import generate_catalogue
    from matching.encoder import Encoder

    if name == "titles":
        return {"titles": generate_catalogue(size)["title"].tolist()}
    if name == "lengths":
        titles = generate_catalogue(min(size, 4000))["title"].tolist()
        tokenizer = Encoder.from_pretrained().tokenizer
        out = {}
        for n in LENGTHS:
            ids = [
                (row * (n // max(1, len(row)) + 1))[: n - 2]
                for row in tokenizer(titles, add_special_tokens=False)["input_ids"]
            ]
            out[f"{n} tokens"] = tokenizer.batch_decode(ids)[: max(200, size * 16 // n)]
        return out
    if name == "lcqmc":
        path = DATA / "lcqmc" / "test.txt"
        rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
        return {"lcqmc": [r[0] for r in rows][:size]} if rows else {}
    path = DATA / "beir_scifact" / "corpus.jsonl"
    if not path.exists():
        return {}
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {"scifact": [f"{d['title']} {d['text']}" for d in docs][: max(200, size // 20)]}


def run(tree: Path, texts_file: Path, out: Path, preset: str, passes: int) -> dict[str, Any]:
    """One fresh process on ``tree``'s code: its encode rates and vectors."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(texts_file), str(out), preset, str(passes)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(label: str, texts: list[str], trees: dict[str, Path], rounds: int, passes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        work = Path(tmp)
        texts_file = work / "texts.json"
        texts_file.write_text(json.dumps(texts), encoding="utf-8")
        run(ROOT, texts_file, work / "exact.npy", "exact", 1)
        exact = np.load(work / "exact.npy")
        rates: dict[str, list[float]] = {name: [] for name in trees}
        floors: dict[str, float] = {}
        plans: dict[str, str] = {}
        for _ in range(rounds):
            for name, tree in trees.items():
                got = run(tree, texts_file, work / f"{name}.npy", "default", passes)
                rates[name].extend(got["rates"])
                plans[name] = f"{got['plan']} ({got['code']})"
                floors[name] = float(np.sum(np.load(work / f"{name}.npy") * exact, axis=1).min())
    medians = {name: float(np.median(r)) for name, r in rates.items()}
    row: dict[str, Any] = {"set": label, "texts": len(texts), "rates": rates, "median": medians, "cos_min": floors}
    row["plans"] = plans
    if "baseline" in medians:
        row["speedup"] = medians["this"] / medians["baseline"]
    return row


def stand_in(titles: list[str], delays_ms: list[float], passes: int) -> list[dict[str, Any]]:
    """Serial against pipelined host steps, the model replaced by a sleep of ``ms`` a batch."""
    import torch

    from matching.config import EncoderConfig
    from matching.encoder import Encoder
    from matching.types import Preset

    # the exact preset runs no inference copy: every batch goes through embed, which the stand-in replaces
    encoder = Encoder.from_pretrained(EncoderConfig(preset=Preset.EXACT))
    rows = []
    for ms in delays_ms:
        batches = [0]

        def device(batch: dict[str, torch.Tensor], ms: float = ms, count: list[int] = batches) -> torch.Tensor:
            count[0] += 1
            time.sleep(ms / 1000)
            return torch.zeros(len(batch["input_ids"]), encoder.dim)

        encoder.embed = device  # type: ignore[method-assign]
        rates: dict[str, list[float]] = {"serial": [], "pipelined": []}
        for _ in range(passes):
            for mode in rates:
                encoder.pipelined = mode == "pipelined"
                batches[0] = 0
                start = time.perf_counter()
                encoder.encode(titles)
                rates[mode].append(len(titles) / (time.perf_counter() - start))
        ceiling = len(titles) / (batches[0] * ms / 1000) if ms else None
        medians = {k: float(np.median(v)) for k, v in rates.items()}
        rows.append({"stand_in_ms": ms, "batches": batches[0], "rates": rates, "median": medians, "ceiling": ceiling})
        top = f"{ceiling:9.0f}/s" if ceiling else "        -"
        print(
            f"stand-in {ms:4.1f} ms a batch, {batches[0]} batches: serial {medians['serial']:8.0f}/s  "
            f"pipelined {medians['pipelined']:8.0f}/s  ({medians['pipelined'] / medians['serial']:.2f}x)  "
            f"the device alone {top}",
            flush=True,
        )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (pip install matplotlib)")
        return
    curve = [r for r in rows if r["set"].endswith(" tokens")]
    if not curve:
        return
    x = [int(r["set"].split()[0]) for r in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in curve[0]["median"]:
        ax.plot(x, [r["median"][name] for r in curve], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="tokens a text", ylabel="texts/s (Encoder.encode, default)")
    ax.set_xticks(x, [str(v) for v in x])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare against")
    parser.add_argument("--sets", nargs="+", default=["titles", "lengths", "lcqmc", "scifact"])
    parser.add_argument("--titles", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--stand-in-ms", type=float, nargs="+", help="only the pipeline against a stand-in device")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "bench_encode.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "scripts" / "plots" / "bench_encode.png")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.stand_in_ms:
        titles = texts_for("titles", args.titles)["titles"]
        result = {"titles": len(titles), "rows": stand_in(titles, args.stand_in_ms, args.passes)}
        write_json(args.json, {**result, "cpus": os.cpu_count(), "seconds": time.perf_counter() - started})
        return
    trees = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    rows = []
    for name in args.sets:
        for label, texts in texts_for(name, args.titles).items():
            rows.append(measure(label, texts, trees, args.rounds, args.passes))
            row = rows[-1]
            ratio = f"{row['speedup']:.2f}x" if "speedup" in row else ""
            medians = "  ".join(f"{k} {v:8.0f}/s" for k, v in row["median"].items())
            floors = "  ".join(f"{k} {v:.5f}" for k, v in row["cos_min"].items())
            print(f"{label:12s} {len(texts):6d} texts  {medians}  {ratio:6s}  cos to exact: {floors}", flush=True)
    write_json(
        args.json,
        {
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "trees": {k: str(v) for k, v in trees.items()},
            "rounds": args.rounds,
            "passes": args.passes,
            "seconds": time.perf_counter() - started,
            "rows": rows,
        },
    )
    plot(rows, args.plot)


if __name__ == "__main__":
    main()
