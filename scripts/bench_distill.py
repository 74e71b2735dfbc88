"""Distilled students on SciFact, side by side with the teacher (issue #11).

    .venv/bin/python scripts/bench_distill.py [--layers 3 4] [--epochs 5] [--json results/bench_distill.json]

The teacher (all-MiniLM-L6-v2, `default` preset) builds a SciFact bundle (title + text); `Matcher.distill` trains an
N-layer student on that bundle's own texts, their sentences and the SciFact *train* queries; each student rebuilds
the bundle and is scored by dense retrieval alone (nDCG@10, test qrels). Throughput: 3,000 generated short product
titles, each student (its `default` and `fast` presets) against `SentenceTransformer(teacher).encode`, batch 64,
best of 2 interleaved passes, one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets as ds

from matching import EncoderConfig, Matcher
from matching.demo import generate_catalogue
from matching.encoder import Encoder, default_model_dir
from matching.evaluate import evaluate, load_qrels, load_queries
from matching.types import Preset

OUT = Path("indexes")


def dense_ndcg(m: Matcher, queries: dict[str, str], qrels: Any) -> float:
    return float(evaluate(m, queries, qrels).columns["dense"]["ndcg@10"])


def rate(fn: Any, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--titles", type=int, default=3000)
    parser.add_argument("--students", default="results/students", help="where the student checkpoints go")
    parser.add_argument("--json", default="results/bench_distill.json")
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    base = ds.require("beir_scifact")
    queries = load_queries(base / "queries.jsonl")
    qrels = load_qrels(base / "qrels" / "test.tsv")
    train_queries = ds.scifact_pairs("train")["query"].drop_duplicates().tolist()
    corpus = ds.scifact_corpus()
    build = {"id_column": "_id", "title_column": ["title", "text"], "overwrite": True, "show_progress": False}
    teacher = Matcher.build(corpus, OUT / "bench-distill-teacher", **build)
    result: dict[str, Any] = {"teacher": {"dense_ndcg@10": dense_ndcg(teacher, queries, qrels)}, "students": []}
    print(f"teacher dense nDCG@10 {result['teacher']['dense_ndcg@10']:.4f}")

    titles = generate_catalogue(args.titles)["title"].tolist()
    st = SentenceTransformer(str(default_model_dir()), device="cpu")
    encoders: dict[str, Encoder] = {}
    for layers in args.layers:
        out = Path(args.students) / f"scifact-l{layers}"
        shutil.rmtree(out, ignore_errors=True)
        report = teacher.distill(out, layers=layers, epochs=args.epochs, extra_texts=train_queries)
        student = Matcher.build(corpus, OUT / f"bench-distill-l{layers}", model=str(out), **build)
        row = {
            "layers": layers,
            "dense_ndcg@10": dense_ndcg(student, queries, qrels),
            "train_seconds": report.seconds,
            "report": report.to_dict(),
        }
        student.close()
        result["students"].append(row)
        print(
            f"student L{layers}: dense nDCG@10 {row['dense_ndcg@10']:.4f}, trained {report.seconds:.0f} s on "
            f"{report.train_texts} texts ({report.sentence_chunks} sentences, {report.extra_texts} queries), "
            f"held-out cosine {report.cosine_before:.3f} -> {report.cosine_after:.3f}"
        )
        for preset in ("default", "fast"):
            encoders[f"L{layers}/{preset}"] = Encoder.from_pretrained(
                EncoderConfig(model=str(out), preset=Preset(preset), batch_size=64)
            )
    teacher.close()

    def st_encode() -> Any:
        return st.encode(titles, batch_size=64, normalize_embeddings=True, show_progress_bar=False)

    st_encode()
    for enc in encoders.values():
        enc.encode(titles[:64])
    best = {name: 0.0 for name in ["st", *encoders]}
    for _ in range(2):
        best["st"] = max(best["st"], rate(st_encode, len(titles)))
        for name, enc in encoders.items():
            best[name] = max(best[name], rate(lambda e=enc: e.encode(titles), len(titles)))
    result["throughput_titles_per_s"] = best
    result["titles"] = len(titles)
    print(f"\n{args.titles} short titles, batch 64: sentence-transformers (teacher) {best['st']:.0f}/s")
    for name in encoders:
        print(f"  student {name:<12} {best[name]:>7.0f}/s  {best[name] / best['st']:.2f}x")
    table = [("teacher", result["teacher"]["dense_ndcg@10"], None)]
    table += [(f"L{r['layers']}", r["dense_ndcg@10"], r["train_seconds"]) for r in result["students"]]
    for name, score, secs in table:
        delta = 100 * (score - result["teacher"]["dense_ndcg@10"])
        print(f"{name:<8} nDCG@10 {score:.4f} ({delta:+.2f} pts)" + (f", {secs:.0f} s training" if secs else ""))
    result["ratios"] = {name: best[name] / best["st"] for name in encoders}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
