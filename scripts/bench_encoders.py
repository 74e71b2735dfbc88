"""Encoder presets and a distilled student side by side (issue #4), in one run on the same texts.

    .venv/bin/python scripts/bench_encoders.py                # full SciFact nDCG, ~15 min on 2 cores
    .venv/bin/python scripts/bench_encoders.py --limit 1000   # quick: nDCG on a 1,000-abstract subset
    .venv/bin/python scripts/bench_encoders.py --student results/bench_student_l3   # reuse a student

For each system (the bundled all-MiniLM-L6-v2 with presets exact/default/fast, and a 3-layer student
distilled from it on the SciFact corpus texts with each preset) it measures

* encode throughput on (a) a fixed sample of SciFact abstracts (title + " " + text) and (b) generated
  product titles, against ``SentenceTransformer(<same model dir>).encode`` at the same batch size
  (best of ``--rounds`` passes each, interleaved, so drift on a shared machine hits all alike);
* nDCG@10 on the SciFact test queries (exact search by dot product over the whole corpus; titles
  encoded in batches, queries one at a time as they are served: under ``fast`` that is int8);
* single-query encoder latency (a 10-word query, median and p99).

Prints a table and writes JSON (default results/bench_encoders.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matching.config import EncoderConfig
from matching.demo import generate_catalogue
from matching.encoder import Encoder, default_model_dir
from matching.evaluate import load_qrels, load_queries
from matching.metrics import mean_metrics
from matching.training.distill import distill
from matching.types import Preset

QUERY = "does vitamin d supplementation reduce the risk of bone fractures"  # 10 words


def best_rate(fn: Any, n: int, rounds: int) -> float:
    """Items per second, the best of ``rounds`` timed calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def latency(fn: Any, runs: int) -> dict[str, float]:
    for _ in range(20):
        fn()
    ms = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - start) * 1000)
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def ndcg10(encoder: Encoder, docs: list[str], doc_ids: list[str], queries: list[str], qids: list[str], qrels: Any):
    start = time.perf_counter()
    d = encoder.encode_titles(docs)
    seconds = time.perf_counter() - start
    q = np.stack([encoder.encode_queries([text])[0] for text in queries])  # one at a time, as served
    top = np.argsort(-(q @ d.T), axis=1)[:, :10]
    runs = {qid: [doc_ids[j] for j in top[i]] for i, qid in enumerate(qids)}
    return mean_metrics(runs, qrels, (10,))["ndcg@10"], len(docs) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="nDCG on a subset: the relevant abstracts + random others")
    parser.add_argument("--throughput-docs", type=int, default=384, help="SciFact abstracts for throughput")
    parser.add_argument("--titles", type=int, default=3000, help="generated product titles for throughput")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per throughput figure (best)")
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--layers", type=int, default=3, help="student layers")
    parser.add_argument("--epochs", type=int, default=3, help="student distillation epochs")
    parser.add_argument("--student", help="reuse this student checkpoint instead of distilling one")
    parser.add_argument("--no-student", action="store_true")
    parser.add_argument("--json", default="results/bench_encoders.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    from datasets import require, scifact_corpus
    from sentence_transformers import SentenceTransformer

    base = require("beir_scifact")
    corpus = scifact_corpus()
    all_docs = (corpus["title"] + " " + corpus["text"]).str.strip().tolist()
    all_ids = corpus["_id"].tolist()
    qtext = load_queries(base / "queries.jsonl")
    qrels = load_qrels(base / "qrels" / "test.tsv")
    qids = list(qrels)
    queries = [qtext[q] for q in qids]
    rng = np.random.default_rng(0)
    keep = np.arange(len(all_docs))
    if args.limit and args.limit < len(all_docs):
        relevant = {d for rel in qrels.values() for d in rel}
        must = [i for i, d in enumerate(all_ids) if d in relevant]
        others = rng.permutation([i for i, d in enumerate(all_ids) if d not in relevant])
        keep = np.sort(np.concatenate([must, others[: max(0, args.limit - len(must))]]).astype(int))
    docs, doc_ids = [all_docs[i] for i in keep], [all_ids[i] for i in keep]
    sample = [all_docs[i] for i in rng.choice(len(all_docs), size=args.throughput_docs, replace=False)]
    titles = generate_catalogue(args.titles)["title"].tolist()
    bs = args.batch_size
    model_dir = default_model_dir()

    # -- the systems ---------------------------------------------------------------------------
    systems: list[tuple[str, str, Any]] = []
    teachers = {
        p: Encoder.from_pretrained(EncoderConfig(model=str(model_dir), batch_size=bs, preset=p)) for p in Preset
    }
    systems += [("MiniLM-L6", p.value, e) for p, e in teachers.items()]
    distill_info: dict[str, Any] | None = None
    if not args.no_student:
        student_dir = Path(args.student) if args.student else Path("results") / f"bench_student_l{args.layers}"
        if not args.student:
            shutil.rmtree(student_dir, ignore_errors=True)
            report = distill(teachers[Preset.DEFAULT], all_docs, student_dir, layers=args.layers, epochs=args.epochs)
            distill_info = report.to_dict()
            print(
                f"distilled {args.layers} layers on {report.train_texts} SciFact texts in {report.seconds:.0f} s: "
                f"held-out cosine to the teacher {report.cosine_before:.4f} -> {report.cosine_after:.4f}"
            )
        students = {
            p: Encoder.from_pretrained(EncoderConfig(model=str(student_dir), batch_size=bs, preset=p)) for p in Preset
        }
        systems += [(f"student-L{args.layers}", p.value, e) for p, e in students.items()]
    st = SentenceTransformer(str(model_dir), device="cpu")

    def st_encode(texts: list[str]) -> np.ndarray:
        return np.asarray(st.encode(texts, batch_size=bs, normalize_embeddings=True, show_progress_bar=False))

    # -- throughput: interleaved rounds, best of each -------------------------------------------
    rows: dict[tuple[str, str], dict[str, Any]] = {(n, p): {"system": n, "preset": p} for n, p, _ in systems}
    st_row: dict[str, Any] = {"system": "sentence-transformers", "preset": "fp32"}
    for key, texts in (("scifact", sample), ("titles", titles)):
        st_encode(texts[:bs])
        for _, _, enc in systems:
            enc.encode(texts[:bs])  # warm-up: builds the preset's inference copy
        best = {k: 0.0 for k in [*rows, "st"]}
        for _ in range(args.rounds):
            best["st"] = max(best["st"], best_rate(lambda t=texts: st_encode(t), len(texts), 1))
            for name, preset, enc in systems:
                rate = best_rate(lambda t=texts, e=enc: e.encode(t), len(texts), 1)
                best[(name, preset)] = max(best[(name, preset)], rate)
        st_row[f"{key}_per_s"] = best["st"]
        for k, row in rows.items():
            row[f"{key}_per_s"] = best[k]
            row[f"{key}_x_st"] = best[k] / best["st"]
        ref = st_encode(texts[:256])
        for (name, preset), row in rows.items():
            enc = next(e for n, p, e in systems if (n, p) == (name, preset))
            row[f"{key}_cos_to_st"] = float(np.mean(np.sum(enc.encode(texts[:256]) * ref, axis=1)))

    # -- single-query latency --------------------------------------------------------------------
    st_row["query"] = latency(lambda: st.encode([QUERY], show_progress_bar=False), args.latency_runs)
    for name, preset, enc in systems:
        rows[(name, preset)]["query"] = latency(lambda e=enc: e.encode_queries([QUERY]), args.latency_runs)

    # -- nDCG@10 ---------------------------------------------------------------------------------
    for name, preset, enc in systems:
        score, rate = ndcg10(enc, docs, doc_ids, queries, qids, qrels)
        rows[(name, preset)]["ndcg@10"] = score
        rows[(name, preset)]["corpus_per_s"] = rate
    exact = rows[("MiniLM-L6", "exact")]["ndcg@10"]
    for row in rows.values():
        row["ndcg_delta_points"] = 100 * (row["ndcg@10"] - exact)
    # mixed towers: titles with one preset, queries with another (same fingerprint, same space)
    mixed = {}
    for tp, qp in ((Preset.EXACT, Preset.FAST), (Preset.FAST, Preset.EXACT), (Preset.DEFAULT, Preset.FAST)):
        d = teachers[tp].encode_titles(docs)
        q = np.stack([teachers[qp].encode_queries([text])[0] for text in queries])
        top = np.argsort(-(q @ d.T), axis=1)[:, :10]
        runs = {qid: [doc_ids[j] for j in top[i]] for i, qid in enumerate(qids)}
        mixed[f"titles={tp.value},queries={qp.value}"] = mean_metrics(runs, qrels, (10,))["ndcg@10"]

    # -- report ----------------------------------------------------------------------------------
    subset = f"{len(docs)} of {len(all_docs)} abstracts" if len(docs) < len(all_docs) else f"all {len(docs)} abstracts"
    result = {
        "model": str(model_dir),
        "batch_size": bs,
        "throughput_texts": {"scifact_sample": len(sample), "product_titles": len(titles)},
        "ndcg_corpus": subset,
        "query": QUERY,
        "sentence_transformers": st_row,
        "systems": list(rows.values()),
        "mixed_presets_ndcg@10": mixed,
        "distillation": distill_info,
        "plans": {f"{n}/{p}": e.plan.describe() for n, p, e in systems},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    head = (
        f"{'system':<13}{'preset':<9}{'SciFact/s':>10}{'x ST':>6}{'titles/s':>10}{'x ST':>6}"
        f"{'nDCG@10':>9}{'Δ pts':>7}{'q med ms':>9}{'q p99':>7}"
    )
    print(f"\nthroughput: {len(sample)} SciFact abstracts, {len(titles)} product titles, batch {bs}; nDCG: {subset}")
    print(head)
    print("-" * len(head))
    print(
        f"{'sent-transf.':<13}{'fp32':<9}{st_row['scifact_per_s']:>10.1f}{'1.00':>6}{st_row['titles_per_s']:>10.0f}"
        f"{'1.00':>6}{'':>9}{'':>7}{st_row['query']['median_ms']:>9.2f}{st_row['query']['p99_ms']:>7.2f}"
    )
    for row in rows.values():
        print(
            f"{row['system']:<13}{row['preset']:<9}{row['scifact_per_s']:>10.1f}{row['scifact_x_st']:>6.2f}"
            f"{row['titles_per_s']:>10.0f}{row['titles_x_st']:>6.2f}{row['ndcg@10']:>9.4f}"
            f"{row['ndcg_delta_points']:>+7.2f}{row['query']['median_ms']:>9.2f}{row['query']['p99_ms']:>7.2f}"
        )
    for k, v in mixed.items():
        print(f"mixed {k}: nDCG@10 {v:.4f} ({100 * (v - exact):+.2f} pts)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
