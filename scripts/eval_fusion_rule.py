"""How the adaptive fusion's ceiling, floor, span, power were chosen (issue #20): each rule scored on every set at once.

    .venv/bin/python scripts/eval_fusion_rule.py [--json results/eval_fusion_rule.json]

Reads the bundles that scripts/eval_hybrid.py and scripts/eval_multilingual.py --only zero build (indexes/bench-sts,
bench-mrpc, bench-lcqmc, bench-ml-zero, bench-scifact; run those first). Per pair (and per SciFact candidate of the
hybrid top 100 of each side) it takes the signals the rule reads once: the cosine, centred on the bundle's mean
cosine, the lexical share, the term-count ratio, the longer side's distinct terms and the query's known-token share;
then scores ``w = ceiling * known ** power * (f + (1 - f) * ratio)``, ``f = floor + (1 - floor) * max(0, 1 - longer /
span)`` (span 0: no lift) for each ceiling, floor, span and power, the way the library does. STS-B dev and MRPC val
are two more sets. Prints a table (each set's figure and its gap to its better single signal; SciFact nDCG@10), best
worst gap first; then today's rule on each set's pairs that share most of their words (lexical share >= 0.6, 0.8)
against the cosine there; and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets as ds

from matching import Matcher
from matching.evaluate import load_qrels, load_queries
from matching.features import DENSE_CEILING, DENSE_FLOOR, DENSE_SPAN, KNOWN_POWER, centred
from matching.metrics import ndcg_at_k, roc_auc, spearman
from matching.search import RETRIEVERS, Queries
from matching.types import Retrieval

OUT = Path("indexes")
CEILINGS = (0.85, 0.9, 0.95, 1.0)
FLOORS = (0.3, 0.35, 0.4, 0.45, 0.5)
SPANS = (0.0, 10.0, 12.0, 15.0, 20.0, 30.0)
POWERS = (1.0, 1.5, 2.0, 3.0)


def terms(m: Matcher, texts: list[str]) -> np.ndarray:
    lexical = m.snapshot.require_lexical()
    return np.array([lexical.distinct_count(t) for t in texts], dtype=np.float64)


def signals(m: Matcher, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The centred cosine, lexical share, term-count ratio, longer side's terms and known-token share of each pair."""
    queries, titles = frame["query"].tolist(), frame["title"].tolist()
    q, t = m.encode_pairs(queries, titles)
    lex = m.snapshot.lexical_features(queries, titles)
    if lex.shape[1] < 5:  # (BM25 share, coverage, bigram Jaccard, ratio, known share[, lift]): the adaptive rule's
        raise SystemExit(f"{m.path} predates the adaptive rule: rebuild it with scripts/eval_hybrid.py")
    cos = centred(np.einsum("ij,ij->i", q, t), m.snapshot.dense_centre)
    longer = np.maximum(terms(m, queries), terms(m, titles))
    y = frame["label"].to_numpy()
    return {"cos": cos, "lex": lex[:, 0], "ratio": lex[:, 3], "known": lex[:, 4], "longer": longer, "y": y}


def pair_sets() -> dict[str, dict[str, np.ndarray]]:
    sets: dict[str, dict[str, np.ndarray]] = {}
    with Matcher.load(OUT / "bench-sts", verify=False) as m:
        test = ds.sts("test", genre=True)
        sets["STS-B test"] = signals(m, test.drop(columns="genre"))
        sets["captions"] = signals(m, test[test["genre"] == "main-captions"].drop(columns="genre"))
        sets["STS-B dev"] = signals(m, ds.sts("dev"))
    with Matcher.load(OUT / "bench-mrpc", verify=False) as m:
        sets["MRPC test"], sets["MRPC val"] = signals(m, ds.mrpc("test")), signals(m, ds.mrpc("val"))
    with Matcher.load(OUT / "bench-lcqmc", verify=False) as m:
        sets["LCQMC test"], sets["LCQMC dev"] = signals(m, ds.lcqmc("test")), signals(m, ds.lcqmc("dev"))
    with Matcher.load(OUT / "bench-ml-zero", verify=False) as m:
        sets["e5 LCQMC test"], sets["e5 LCQMC dev"] = signals(m, ds.lcqmc("test")), signals(m, ds.lcqmc("dev"))
    return sets


def scifact() -> list[dict[str, Any]]:
    """Per test query, the signals of its hybrid candidates and which of them are relevant."""
    base = ds.require("beir_scifact")
    queries, qrels = load_queries(base / "queries.jsonl"), load_qrels(base / "qrels" / "test.tsv")
    out = []
    with Matcher.load(OUT / "bench-scifact", verify=False) as m:
        snap = m.snapshot
        qids = sorted(qrels)
        texts = [queries[q] for q in qids]
        vectors = snap.encode_queries(texts)
        found = RETRIEVERS[Retrieval.HYBRID].retrieve(snap, Queries(vectors, texts), 100, None)
        for i, qid in enumerate(qids):
            rows = found.ids[i][found.ids[i] >= 0]
            stored = snap.store.get(rows.tolist())
            lex = snap.lexical_features([texts[i]] * len(rows), [r.title for r in stored])
            cos = centred(np.asarray(snap.store.vectors[rows]) @ vectors[i], snap.dense_centre)
            ids = [str(snap.store.external_id(r.external_id)) for r in stored]
            longer = np.maximum(terms(m, [texts[i]]), terms(m, [r.title for r in stored]))
            out.append({"cos": cos, "lex": lex[:, 0], "ratio": lex[:, 3], "known": lex[:, 4], "ids": ids})
            out[-1]["longer"] = longer
            out[-1]["relevant"] = qrels[qid]
    return out


def fused(s: dict[str, Any], ceiling: float, floor: float, span: float, power: float = 1.0) -> np.ndarray:
    f = floor + (1 - floor) * (np.clip(1 - s["longer"] / span, 0, 1) if span else 0)
    w = ceiling * s["known"] ** power * (f + (1 - f) * s["ratio"])
    out: np.ndarray = w * s["cos"] + (1 - w) * s["lex"]
    return out


def metric(name: str, y: np.ndarray, scores: np.ndarray) -> float:
    return spearman(scores, y) if name.startswith(("STS", "captions")) else roc_auc(y, scores)


def ndcg(queries: list[dict[str, Any]], ceiling: float, floor: float, span: float, power: float) -> float:
    order = (np.argsort(-fused(q, ceiling, floor, span, power), kind="stable") for q in queries)
    ranked = ([q["ids"][j] for j in o] for q, o in zip(queries, order, strict=True))
    return float(np.mean([ndcg_at_k(r, q["relevant"], 10) for r, q in zip(ranked, queries, strict=True)]))


def overlapping(sets: dict[str, dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Today's rule on the pairs that share most of their words (lexical share >= 0.6 and >= 0.8), against the
    cosine and the lexical share on the same pairs: where the words say "alike" and the meaning may not."""
    out: list[dict[str, Any]] = []
    for name, s in sets.items():
        for least in (0.0, 0.6, 0.8):
            keep = s["lex"] >= least
            part = {k: v[keep] for k, v in s.items()}
            score = fused(part, DENSE_CEILING, DENSE_FLOOR, DENSE_SPAN, KNOWN_POWER)
            figures = {k: metric(name, part["y"], v) for k, v in (("cos", part["cos"]), ("lex", part["lex"]))}
            out.append({"set": name, "lexical_share_at_least": least, "pairs": int(keep.sum()), **figures})
            out[-1]["default"] = metric(name, part["y"], score)
    print("| set | lexical share >= | pairs | cosine | lexical share | default | default - cosine |")
    print("|---|---|---|---|---|---|---|")
    for r in out:
        cells = f"{r['cos']:.4f} | {r['lex']:.4f} | {r['default']:.4f} | {100 * (r['default'] - r['cos']):+.1f}"
        print(f"| {r['set']} | {r['lexical_share_at_least']:g} | {r['pairs']} | {cells} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="results/eval_fusion_rule.json")
    args = parser.parse_args()
    sets, sf = pair_sets(), scifact()
    best = {n: max(metric(n, s["y"], s["cos"]), metric(n, s["y"], s["lex"])) for n, s in sets.items()}
    rows: list[dict[str, Any]] = []
    for ceiling, floor, span, power in itertools.product(CEILINGS, FLOORS, SPANS, POWERS):
        figures = {n: metric(n, s["y"], fused(s, ceiling, floor, span, power)) for n, s in sets.items()}
        gaps = {n: figures[n] - best[n] for n in sets}
        rule: dict[str, Any] = {"ceiling": ceiling, "floor": floor, "span": span, "power": power}
        rows.append({**rule, "sets": figures, "gaps": gaps, "worst_gap": min(gaps.values())})
        rows[-1]["scifact_ndcg@10"] = ndcg(sf, ceiling, floor, span, power)
    rows.sort(key=lambda r: -r["worst_gap"])
    names = list(sets)
    print("| ceiling, floor, span, power | " + " | ".join(names) + " | SciFact | worst gap |")
    print("|---|" + "---|" * (len(names) + 2))
    for r in rows:
        cells = [f"{r['sets'][n]:.4f} ({100 * r['gaps'][n]:+.1f})" for n in names]
        line = f"| {r['ceiling']:g}, {r['floor']:g}, {r['span']:g}, {r['power']:g} | " + " | ".join(cells)
        print(line + f" | {r['scifact_ndcg@10']:.4f} | {100 * r['worst_gap']:+.1f} |")
    shared = overlapping(sets)
    ds.write_json(args.json, {"better_single_signal": best, "rules": rows, "overlapping_pairs": shared})


if __name__ == "__main__":
    main()
