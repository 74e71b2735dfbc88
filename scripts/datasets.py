"""Loaders for the public benchmark sets in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

DATA = Path(os.environ.get("MATCHING_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def require(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        raise SystemExit(f"{path} is missing: these benchmarks read ../shared/data (or set MATCHING_DATA)")
    return path


def scifact_corpus() -> pd.DataFrame:
    """SciFact corpus as id + title + text (index title + " " + text, as BEIR does)."""
    rows = []
    with (require("beir_scifact") / "corpus.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            rows.append({"_id": str(r["_id"]), "title": r.get("title", ""), "text": r.get("text", "")})
    return pd.DataFrame(rows)


def build_scifact(out: Path) -> Any:
    """A default build of the SciFact corpus at ``out`` (title and text indexed together), overwriting it."""
    from matching import Matcher

    corpus = scifact_corpus()
    return Matcher.build(
        corpus, out, id_column="_id", title_column=["title", "text"], overwrite=True, show_progress=False
    )


def scifact_pairs(split: str) -> pd.DataFrame:
    """(query, title, label) positive pairs of a SciFact qrels split; title = title + " " + text."""
    from matching.evaluate import load_qrels, load_queries

    base = require("beir_scifact")
    queries = load_queries(base / "queries.jsonl")
    corpus = scifact_corpus()
    docs = dict(zip(corpus["_id"], (corpus["title"] + " " + corpus["text"]).str.strip(), strict=True))
    qrels = load_qrels(base / "qrels" / f"{split}.tsv")
    rows = [(queries[q], docs[d], g) for q, rel in qrels.items() for d, g in rel.items() if g > 0 and d in docs]
    return pd.DataFrame(rows, columns=["query", "title", "label"])


def sts(split: str, *, genre: bool = False) -> pd.DataFrame:
    """STS Benchmark split as query (s1), title (s2), label (0-5 similarity)[, genre (main-captions, ...)]."""
    path = require("stsbenchmark") / f"sts-{split}.csv"
    rows = []
    with path.open(encoding="utf-8") as fh:
        for fields in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows.append((fields[5], fields[6], float(fields[4]), fields[0]))
    frame = pd.DataFrame(rows, columns=["query", "title", "label", "genre"])
    return frame if genre else frame.drop(columns="genre")


def lcqmc(split: str) -> pd.DataFrame:
    """LCQMC split (dev, test) as query (s1), title (s2), label (1 = same question)."""
    rows = []
    with (require("lcqmc") / f"{split}.txt").open(encoding="utf-8") as fh:
        for line in fh:
            s1, s2, label = line.rstrip("\n").split("\t")
            rows.append((s1, s2, int(label)))
    return pd.DataFrame(rows, columns=["query", "title", "label"])


def lcqmc_sentences() -> list[str]:
    """Every distinct sentence of LCQMC dev and test (both sides), sorted."""
    frames = [lcqmc(split) for split in ("dev", "test")]
    return sorted({s for f in frames for s in (*f["query"], *f["title"])})


def mrpc(split: str) -> pd.DataFrame:
    """MRPC split (train, val, test) as query, title, label (1 = paraphrase)."""
    path = require("mrpc") / f"msr-para-{split}.tsv"
    rows = []
    with path.open(encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for fields in reader:
            rows.append((fields[3], fields[4], int(fields[0])))
    return pd.DataFrame(rows, columns=["query", "title", "label"])


def run_sets(runs: dict[str, Callable[[], dict[str, Any]]], only: list[str], json_path: str) -> dict[str, Any]:
    """Run the sets named in ``only``, printing each one's figures as it finishes, and write them all as JSON."""
    results: dict[str, Any] = {}
    for name in only:
        start = time.perf_counter()
        results[name] = runs[name]()
        print(f"{name} ({time.perf_counter() - start:.0f} s): {json.dumps(results[name])}", flush=True)
    write_json(json_path, results)
    return results


def write_json(path: str, results: Any) -> None:
    """Write ``results`` as indented JSON at ``path`` (its folder made if missing) and say so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
