"""Chinese with the multilingual encoder (issue #20): LCQMC with ``model="multilingual-e5-small"``.

    .venv/bin/python scripts/eval_multilingual.py [--only zero finetune distill] [--layers 4] [--mix 0.5]
        [--json results/eval_multilingual.json]

- zero: a default bundle of every distinct LCQMC sentence built with the multilingual encoder; test (and dev)
  ROC-AUC of the cosine, the lexical share and the untrained default (the fused score), side by side.
- finetune: ``finetune`` on dev (the encoder, then the reranker on the same pairs, with default flags, or
  ``--mix``); test ROC-AUC of the cosine and of the score.
- distill: a ``--layers``-layer student of the (zero-shot) multilingual encoder trained on the bundle's own
  sentences, no labels; a bundle built with it; test ROC-AUC, and titles/s of teacher and student on the same
  5,000 test sentences (default preset, one run after the other).
Bundles are rebuilt in indexes/bench-ml-* each run. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets as ds

from matching import Matcher
from matching.metrics import roc_auc

OUT = Path("indexes")
MODEL = "multilingual-e5-small"


def bundle(name: str, model: str | Path) -> Matcher:
    """A default bundle of every distinct LCQMC dev and test sentence, built with ``model``."""
    frames = [ds.lcqmc("dev"), ds.lcqmc("test")]
    titles = pd.concat([f[c] for f in frames for c in ("query", "title")]).drop_duplicates().tolist()
    catalogue = pd.DataFrame({"id": range(len(titles)), "title": titles})
    return Matcher.build(catalogue, OUT / f"bench-ml-{name}", model=str(model), overwrite=True, show_progress=False)


def signals(m: Matcher, frame: pd.DataFrame) -> dict[str, float]:
    queries, titles = frame["query"].tolist(), frame["title"].tolist()
    y = frame["label"].to_numpy()
    q, t = m.encode_pairs(queries, titles)
    lexical = m.snapshot.lexical_features(queries, titles)[:, 0]
    out = {
        "cosine": roc_auc(y, np.einsum("ij,ij->i", q, t)),
        "lexical": roc_auc(y, lexical),
        "score": roc_auc(y, m.score_pairs(queries, titles)),
    }
    out["gap_to_best_signal"] = out["score"] - max(out["cosine"], out["lexical"])
    return out


def zero() -> dict[str, Any]:
    start = time.perf_counter()
    m = bundle("zero", MODEL)
    out: dict[str, Any] = {"build_seconds": time.perf_counter() - start, **signals(m, ds.lcqmc("test"))}
    out["dev"] = signals(m, ds.lcqmc("dev"))  # a second Chinese set: dev's texts differ from test's
    out["unknown_token_share"] = m.manifest.source["unknown_token_share"]
    m.close()
    return out


def zero_bundle() -> Matcher:
    """The zero-shot bundle (built by ``zero``, or now)."""
    return Matcher.load(OUT / "bench-ml-zero") if (OUT / "bench-ml-zero").is_dir() else bundle("zero", MODEL)


def finetune(mix: float | None) -> dict[str, Any]:
    with zero_bundle() as zero:  # a copy: the same rows and vectors, no second encoding of the catalogue
        m = zero.copy(OUT / "bench-ml-finetune", overwrite=True, show_progress=False)
    start = time.perf_counter()
    settings: dict[str, Any] = {} if mix is None else {"mix": mix}
    report = m.finetune(ds.lcqmc("dev"), show_progress=False, **settings)
    out: dict[str, Any] = {"seconds": time.perf_counter() - start, **signals(m, ds.lcqmc("test"))}
    out["encoder"] = {"metric": report.metric, "baseline": report.baseline, "best": report.best_metric}
    out["encoder"]["mix"] = report.config["mix"]
    out["encoder"]["compared"] = report.compared
    scorer = report.scorer_report or {}
    out["reranker"] = {"chosen": scorer.get("chosen"), "held_out": scorer.get("compared")}
    m.close()
    return out


def speed(m: Matcher, texts: list[str]) -> float:
    m.encoder.encode_titles(texts[:64])  # warm-up (the preset's runner is built on first use)
    start = time.perf_counter()
    m.encoder.encode_titles(texts)
    return len(texts) / (time.perf_counter() - start)


def distill(layers: int) -> dict[str, Any]:
    teacher = zero_bundle()
    # the student's checkpoint (its bundle is bench-ml-student-L*); one already distilled is reused: 87 minutes here
    student_dir = OUT / f"bench-ml-student-L{layers}-model"
    start = time.perf_counter()
    if (student_dir / "distill_report.json").is_file():
        report = json.loads((student_dir / "distill_report.json").read_text(encoding="utf-8"))
        out: dict[str, Any] = {"layers": layers, "seconds": report["seconds"], "reused": True}
    else:
        report = dataclasses.asdict(teacher.distill(student_dir, layers=layers, show_progress=False))
        out = {"layers": layers, "seconds": time.perf_counter() - start}
    out["cosine_to_teacher"] = [report["cosine_before"], report["cosine_after"]]
    student = bundle(f"student-L{layers}", student_dir)
    test = ds.lcqmc("test")
    out.update(signals(student, test))
    texts = list(dict.fromkeys(test["query"]))[:5000]
    out["teacher_titles_per_s"] = speed(teacher, texts)
    out["student_titles_per_s"] = speed(student, texts)
    out["speedup"] = out["student_titles_per_s"] / out["teacher_titles_per_s"]
    teacher.close()
    student.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=["zero", "finetune", "distill"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mix", type=float, help="finetune: the fine-tuned weights' share (default: the library's)")
    parser.add_argument("--json", default="results/eval_multilingual.json")
    args = parser.parse_args()
    runs = {"zero": zero, "finetune": lambda: finetune(args.mix), "distill": lambda: distill(args.layers)}
    ds.run_sets(runs, args.only, args.json)


if __name__ == "__main__":
    main()
