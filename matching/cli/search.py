"""Commands that read a bundle: search, score, evaluate."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matching.cli.options import RETRIEVALS, add_model, add_preset, add_quiet, shown


def add_commands(sub: Any) -> None:
    """Add this family's subparsers to ``sub`` (the result of ``add_subparsers``)."""
    _add_search(sub)
    _add_score(sub)
    _add_evaluate(sub)


# -- parsers -------------------------------------------------------------------------------------------


def _add_search(sub: Any) -> None:
    p = sub.add_parser("search", help="print the best matches for one or more queries")
    p.add_argument("bundle")
    p.add_argument("query", nargs="+")
    p.add_argument("-k", type=int, default=10, help="matches per query (default 10)")
    p.add_argument("--candidates", type=int, default=100, help="retrieved candidates to rerank (default 100)")
    p.add_argument("--no-rerank", action="store_true", help="rank by the retrieval score alone")
    p.add_argument(
        "--retrieval",
        choices=RETRIEVALS,
        help="how candidates are found (default: the bundle's, hybrid unless built otherwise)",
    )
    add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_preset(p)
    p.add_argument(
        "--where",
        action="append",
        metavar="EXPR",
        help="metadata filter applied inside retrieval, repeatable: brand=acme, 'price<50', "
        '\'color in ["red", "blue"]\' (values are JSON where they parse)',
    )
    p.set_defaults(func=_cmd_search)


def _add_score(sub: Any) -> None:
    p = sub.add_parser("score", help="score (query, title) pairs from a CSV/TSV into a new file")
    p.add_argument("bundle")
    p.add_argument("pairs", help="CSV/TSV with a query and a title column (other columns are kept)")
    p.add_argument("--out", required=True, help="output CSV/TSV: the input rows plus score and cosine")
    p.add_argument("--query-column", default="query")
    p.add_argument("--title-column", default="title")
    p.add_argument("--chunksize", type=int, default=20_000)
    add_preset(p)
    add_model(p)
    add_quiet(p)
    p.set_defaults(func=_cmd_score)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Recall@k / MRR@10 / nDCG@10 on a BEIR-layout query set, or every signal's ROC-AUC / Spearman on "
        "labelled pairs (--pairs)",
    )
    p.add_argument("bundle")
    p.add_argument("--queries", help="queries.jsonl ({_id, text} per line)")
    p.add_argument("--qrels", help="qrels TSV (query-id, corpus-id, score; with header)")
    p.add_argument(
        "--pairs",
        help="labelled (query, title, label) pairs (CSV/TSV/JSONL) instead of --queries/--qrels: cosine, lexical "
        "share, fused default and reranker side by side",
    )
    p.add_argument("--query-column", default="query")
    p.add_argument("--title-column", default="title")
    p.add_argument("--label-column", default="label")
    p.add_argument("-k", type=int, nargs="+", default=[10, 100], help="cut-offs (default: 10 100)")
    p.add_argument("--candidates", type=int, default=100)
    add_preset(p)
    add_model(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)


# -- commands ------------------------------------------------------------------------------------------


def _print_hits(query: str, hits: Sequence[Any]) -> None:
    print(f"\nquery: {shown(query)}")
    for rank, h in enumerate(hits, 1):
        meta = f"  {json.dumps(h.metadata, ensure_ascii=False)}" if h.metadata else ""
        print(f"  {rank:>2}. {h.score:.4f}  [{shown(h.id)}] {shown(h.title)}{shown(meta)}")


def _cmd_search(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from matching import Matcher
    from matching.store import parse_where

    where = parse_where(args.where) if args.where else None
    with Matcher.load(args.bundle, model=args.model, preset=args.preset) as matcher:
        results = matcher.search_batch(
            args.query,
            args.k,
            candidates=args.candidates,
            rerank=not args.no_rerank,
            where=where,
            retrieval=args.retrieval,
        )
    if args.json:
        payload = [
            {"query": q, "matches": [asdict(h) for h in hits]} for q, hits in zip(args.query, results, strict=True)
        ]
        print(json.dumps(payload if len(payload) > 1 else payload[0], ensure_ascii=False, indent=2))
    else:
        for q, hits in zip(args.query, results, strict=True):
            _print_hits(q, hits)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from matching import Matcher
    from matching.pairs import score_file

    with Matcher.load(args.bundle, model=args.model, preset=args.preset) as matcher:
        n = score_file(
            matcher.snapshot,
            Path(args.pairs),
            Path(args.out),
            query_column=args.query_column,
            title_column=args.title_column,
            chunksize=args.chunksize,
            show_progress=not args.quiet,
        )
    print(f"scored {n} pairs into {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from matching import Matcher
    from matching.errors import ConfigError
    from matching.evaluate import evaluate, load_qrels, load_queries

    if args.pairs is not None:
        if args.queries or args.qrels:
            raise ConfigError("give either --pairs or --queries with --qrels, not both")
        return _evaluate_pairs(args)
    if not (args.queries and args.qrels):
        raise ConfigError("evaluate needs --queries and --qrels (a BEIR-layout query set), or --pairs")
    queries, qrels = load_queries(args.queries), load_qrels(args.qrels)
    with Matcher.load(args.bundle, model=args.model, preset=args.preset) as matcher:
        report = evaluate(matcher, queries, qrels, k_values=args.k, candidates=args.candidates)
    if args.json:
        fields = {
            "queries": report.queries,
            "retrieval": report.retrieval,
            "reranked": report.reranked,
            "columns": report.columns,
        }
        print(json.dumps(fields, indent=2))
    else:
        print(report.table())
    return 0


def _evaluate_pairs(args: argparse.Namespace) -> int:
    from matching import Matcher
    from matching.evaluate import evaluate_pairs

    columns = {"query_column": args.query_column, "title_column": args.title_column, "label_column": args.label_column}
    with Matcher.load(args.bundle, model=args.model, preset=args.preset) as matcher:
        report = evaluate_pairs(matcher, args.pairs, **columns)
    if args.json:
        fields = {"pairs": report.pairs, "metric": report.metric, "signals": report.signals, "trained": report.trained}
        print(json.dumps(fields, indent=2))
    else:
        print(report.table())
    return 0
