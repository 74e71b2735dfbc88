"""The `fast` preset against sentence-transformers on short titles, both ways a user meets it (issue #11).

    .venv/bin/python scripts/bench_fast.py [--titles 3000] [--rounds 3] [--json results/bench_fast.json]

- pure encoding: 3,000 generated product titles, the model loaded and warm: `Encoder(preset).encode(titles)`
  against `SentenceTransformer(same dir).encode(titles, batch_size=64)`;
- end to end as a user builds: `Matcher.build(titles, preset=...)` (model load, encode, SQLite, FAISS, BM25,
  manifest) against `SentenceTransformer(dir)` + `.encode(titles)` (model load included), in this process after
  the imports.
Best of `--rounds` interleaved passes each (a shared machine drifts; interleaving hits all alike). One run, one table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matching import EncoderConfig, Matcher
from matching.demo import generate_catalogue
from matching.encoder import Encoder, default_model_dir


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--titles", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["default", "fast"])
    parser.add_argument("--json", default="results/bench_fast.json")
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    model_dir = str(default_model_dir())
    catalogue = generate_catalogue(args.titles)[["id", "title"]]
    titles = catalogue["title"].tolist()
    work = Path(tempfile.mkdtemp(prefix="bench-fast-"))
    st = SentenceTransformer(model_dir, device="cpu")
    encoders = {p: Encoder.from_pretrained(EncoderConfig(model=model_dir, preset=p)) for p in args.presets}

    def st_encode(model: Any) -> Any:
        return model.encode(titles, batch_size=64, normalize_embeddings=True, show_progress_bar=False)

    def st_end_to_end() -> None:
        st_encode(SentenceTransformer(model_dir, device="cpu"))

    def build(preset: str) -> None:
        Matcher.build(catalogue, work / preset, preset=preset, overwrite=True, show_progress=False).close()

    st_encode(st)
    for enc in encoders.values():
        enc.encode(titles[:256])
    pure = {"st": np.inf, **{p: np.inf for p in args.presets}}
    e2e = {"st": np.inf, **{p: np.inf for p in args.presets}}
    for _ in range(args.rounds):
        pure["st"] = min(pure["st"], timed(lambda: st_encode(st)))
        e2e["st"] = min(e2e["st"], timed(st_end_to_end))
        for preset, enc in encoders.items():
            pure[preset] = min(pure[preset], timed(lambda e=enc: e.encode(titles)))
            e2e[preset] = min(e2e[preset], timed(lambda p=preset: build(p)))
    cos = {p: float(np.mean(np.sum(encoders[p].encode(titles) * st_encode(st), axis=1))) for p in args.presets}
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    print(f"{len(titles)} short titles, best of {args.rounds}; torch threads {torch.get_num_threads()}")
    print(f"{'system':<22}{'encode s':>9}{'titles/s':>10}{'x ST':>7}{'build s':>9}{'x ST':>7}{'cos to ST':>11}")
    print(
        f"{'sentence-transformers':<22}{pure['st']:>9.3f}{len(titles) / pure['st']:>10.0f}{'1.00':>7}"
        f"{e2e['st']:>9.3f}{'1.00':>7}"
    )
    for p in args.presets:
        row = {
            "preset": p,
            "encode_s": pure[p],
            "titles_per_s": args.titles / pure[p],
            "encode_x_st": pure["st"] / pure[p],
            "build_s": e2e[p],
            "build_x_st": e2e["st"] / e2e[p],
            "cos_to_st": cos[p],
        }
        rows.append(row)
        print(
            f"{'matching ' + p:<22}{pure[p]:>9.3f}{row['titles_per_s']:>10.0f}{row['encode_x_st']:>7.2f}"
            f"{e2e[p]:>9.3f}{row['build_x_st']:>7.2f}{cos[p]:>11.4f}"
        )
    result = {"titles": len(titles), "rounds": args.rounds, "st": {"encode_s": pure["st"], "e2e_s": e2e["st"]}}
    result["presets"] = rows
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
