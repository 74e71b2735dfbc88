"""How much of a fine-tune to publish (issue #20): the WiSE-FT curve of ``FinetuneConfig.mix`` on every set.

    .venv/bin/python scripts/eval_mix.py [--only minilm-sts minilm-mrpc minilm-captions minilm-lcqmc e5-lcqmc e5-sts]
        [--json results/eval_mix.json]
    .venv/bin/python scripts/eval_mix.py --summarise results/eval_mix.json [more JSON]

Each case fine-tunes one encoder once (``finetune_encoder`` with default flags but ``mix=1``; graded or 0/1 pairs
train with CoSENT and no bundle, SciFact's positives with mined negatives) and then scores its test sets at each
mix of the starting and the fine-tuned weights, ``(1 - mix) * start + mix * tuned``, beside the validation metric
the fine-tune saw (Spearman of the cosine on its validation pairs). ``--summarise`` prints, per mix, each test's
change against the untrained encoder and the mean and worst change and regret (against each test's best mix) over
every case. The cases:

- minilm-sts: all-MiniLM-L6-v2 on STS-B train (dev validates); STS-B test Spearman, MRPC test ROC-AUC.
- minilm-mrpc: on MRPC train (val validates); MRPC test ROC-AUC, STS-B test Spearman.
- minilm-captions: on STS-B train's news and forum pairs (dev's validate); the captions of STS-B test.
- minilm-lcqmc: on LCQMC dev (a tenth held out); LCQMC test ROC-AUC (an English model on Chinese).
- e5-lcqmc: multilingual-e5-small on LCQMC dev; LCQMC test ROC-AUC.
- e5-sts: multilingual-e5-small on STS-B train; STS-B test Spearman, MRPC test ROC-AUC.
- minilm-scifact: on SciFact's train qrels (positives only: MNRL with negatives mined from a default bundle of the
  corpus, a tenth of the queries held out); test nDCG@10 of exact dense retrieval over the corpus, and on the test
  queries whose relevant abstracts no train query has (no validation column: that metric is retrieval).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets as ds

from matching.config import EncoderConfig
from matching.encoder import Encoder
from matching.evaluate import load_qrels, load_queries
from matching.exact import exact_top_k
from matching.metrics import mean_metrics, roc_auc, spearman
from matching.training.finetune import FinetuneConfig, finetune_encoder, mix_weights
from matching.training.loop import train_valid_pairs

MIXES = [0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
E5 = "multilingual-e5-small"
OUT = Path("indexes")

Metric = Callable[[np.ndarray, np.ndarray], float]
Test = Callable[[Encoder], float]


def cosines(encoder: Encoder, frame: pd.DataFrame) -> np.ndarray:
    q = encoder.encode_queries(frame["query"].tolist())
    t = encoder.encode_titles(frame["title"].tolist())
    return np.asarray(np.einsum("ij,ij->i", q, t))


def sts_scored(y: np.ndarray, s: np.ndarray) -> float:
    return spearman(s, y)


def auc_scored(y: np.ndarray, s: np.ndarray) -> float:
    return roc_auc(y, s)


def captions(split: str, keep: bool) -> pd.DataFrame:
    frame = ds.sts(split, genre=True)
    frame = frame[(frame["genre"] == "main-captions") == keep]
    return frame.drop(columns="genre").reset_index(drop=True)


def on_pairs(frame: pd.DataFrame, metric: Metric) -> Test:
    return lambda encoder: metric(frame["label"].to_numpy(), cosines(encoder, frame))


def curve(
    model: str | None,
    train: pd.DataFrame,
    valid: pd.DataFrame | None,
    tests: dict[str, Test],
    snap: Any = None,
) -> dict[str, Any]:
    """Fine-tune once; every test metric (and validation's Spearman) at each mix."""
    train, valid = train_valid_pairs(train, valid, FinetuneConfig())  # the split finetune would make itself
    graded = len(np.unique(valid["label"])) > 1
    start_encoder = Encoder.from_pretrained(EncoderConfig(model=model))
    started = time.perf_counter()
    # mix=1: the whole fine-tune, which the curve then mixes (the library's default publishes a mixture already)
    tuned, report = finetune_encoder(snap, start_encoder, train, valid, show_progress=False, mix=1.0)
    out: dict[str, Any] = {"finetune_seconds": time.perf_counter() - started, "best_epoch": report.best_epoch}
    out["validation"] = {"baseline": report.baseline, "best": report.best_metric}
    start_state = {k: v.clone() for k, v in start_encoder.model.state_dict().items()}
    tuned_state = {k: v.clone() for k, v in tuned.model.state_dict().items()}
    rows = []
    for mix in MIXES:
        mix_weights(tuned.model, start_state, tuned_state, mix)
        row: dict[str, float] = {"mix": mix}
        if graded:
            row["validation"] = spearman(cosines(tuned, valid), valid["label"].to_numpy())
        for name, test in tests.items():
            row[name] = test(tuned)
        rows.append(row)
        print("  " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    out["curve"] = rows
    return out


def scifact() -> dict[str, Any]:
    base = ds.require("beir_scifact")
    queries = load_queries(base / "queries.jsonl")
    test_qrels = load_qrels(base / "qrels" / "test.tsv")
    train_docs = {d for rel in load_qrels(base / "qrels" / "train.tsv").values() for d in rel}
    unseen = {q: rel for q, rel in test_qrels.items() if not set(rel) & train_docs}
    corpus = ds.scifact_corpus()
    doc_ids = corpus["_id"].tolist()
    docs = (corpus["title"] + " " + corpus["text"]).str.strip().tolist()

    def dense(qrels: dict[str, dict[str, int]]) -> Test:
        def measure(encoder: Encoder) -> float:
            _, top = exact_top_k(encoder.encode_titles(docs), encoder.encode_queries([queries[k] for k in qrels]), 10)
            ranked = {k: [doc_ids[j] for j in row] for k, row in zip(qrels, top, strict=True)}
            return mean_metrics(ranked, qrels, k_values=(10,))["ndcg@10"]

        return measure

    with ds.build_scifact(OUT / "bench-mix-scifact") as m:
        tests = {"scifact_test_dense": dense(test_qrels), "unseen_docs_dense": dense(unseen)}
        return curve(None, ds.scifact_pairs("train"), None, tests, snap=m.snapshot)


def summarise(paths: list[str]) -> None:
    """Per mix, each test's change against the untrained encoder (mix 0) and its regret against the best mix of
    its case, in points; then the mean and worst of each over every test of every case in ``paths``."""
    tests: dict[str, dict[float, float]] = {}
    for path in paths:
        for case, result in json.loads(Path(path).read_text(encoding="utf-8")).items():
            for row in result["curve"]:
                for name, value in row.items():
                    if name not in ("mix", "validation"):
                        tests.setdefault(f"{case}: {name}", {})[row["mix"]] = value
    print(f"{'test':40}" + "".join(f"{m:>8g}" for m in MIXES))
    regrets: dict[float, list[float]] = {m: [] for m in MIXES}
    changes: dict[float, list[float]] = {m: [] for m in MIXES}
    for name, values in tests.items():
        best = max(values.values())
        for m in MIXES:
            regrets[m].append(100 * (values[m] - best))
            changes[m].append(100 * (values[m] - values[0.0]))
        print(f"{name:40}" + "".join(f"{100 * (values[m] - values[0.0]):+8.2f}" for m in MIXES))
    for label, table in (("change: mean", changes), ("regret: mean", regrets)):
        print(f"{label:40}" + "".join(f"{np.mean(table[m]):+8.2f}" for m in MIXES))
        print(f"{label.replace('mean', 'worst'):40}" + "".join(f"{min(table[m]):+8.2f}" for m in MIXES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        nargs="+",
        default=["minilm-sts", "minilm-mrpc", "minilm-captions", "minilm-lcqmc", "e5-lcqmc", "e5-sts"],
    )
    parser.add_argument("--json", default="results/eval_mix.json")
    parser.add_argument("--summarise", nargs="+", metavar="JSON", help="print the table of these runs' curves")
    args = parser.parse_args()
    if args.summarise:
        summarise(args.summarise)
        return
    sts_test, mrpc_test = on_pairs(ds.sts("test"), sts_scored), on_pairs(ds.mrpc("test"), auc_scored)
    lcqmc_test = on_pairs(ds.lcqmc("test"), auc_scored)
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "minilm-sts": lambda: curve(
            None, ds.sts("train"), ds.sts("dev"), {"sts_test": sts_test, "mrpc_test": mrpc_test}
        ),
        "minilm-mrpc": lambda: curve(
            None, ds.mrpc("train"), ds.mrpc("val"), {"mrpc_test": mrpc_test, "sts_test": sts_test}
        ),
        "minilm-captions": lambda: curve(
            None,
            captions("train", False),
            captions("dev", False),
            {"captions_test": on_pairs(captions("test", True), sts_scored)},
        ),
        "minilm-lcqmc": lambda: curve(None, ds.lcqmc("dev"), None, {"lcqmc_test": lcqmc_test}),
        "e5-lcqmc": lambda: curve(E5, ds.lcqmc("dev"), None, {"lcqmc_test": lcqmc_test}),
        "e5-sts": lambda: curve(E5, ds.sts("train"), ds.sts("dev"), {"sts_test": sts_test, "mrpc_test": mrpc_test}),
        "minilm-scifact": scifact,
    }
    ds.run_sets(runs, args.only, args.json)


if __name__ == "__main__":
    main()
