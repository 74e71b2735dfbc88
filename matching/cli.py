"""Command line: a thin argparse layer over the API. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _cmd_build(args: argparse.Namespace) -> int:
    from matching import EncoderConfig, Matcher

    source = Path(args.source)
    out = Path(args.out) if args.out else Path("indexes") / source.name.split(".")[0]
    encoder_config = EncoderConfig(
        model=args.model,
        pooling=args.pooling,
        max_length=args.max_length,
        batch_size=args.batch_size,
        preset=args.preset,
    )
    matcher = Matcher.build(
        source,
        out,
        id_column=args.id_column,
        title_column=args.title_column,
        encoder_config=encoder_config,
        index_config=_index_config(args),
        skip_bad_rows=args.skip_bad_rows,
        encoding=args.encoding,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
        analyzer=args.analyzer,
        retrieval=args.retrieval,
        engine=args.engine,
        ray_address=args.ray_address,
        encoders=args.encoders,
    )
    skipped = matcher.manifest.source.get("skipped_rows", 0)
    print(
        f"built {out}: {len(matcher)} titles, dim {matcher.manifest.dim}, index {matcher.manifest.factory}"
        + (f", {skipped} bad rows skipped" if skipped else "")
    )
    return 0


def _index_config(args: argparse.Namespace) -> Any:
    from matching import IndexConfig

    budget = int(args.memory_budget_mb * 2**20) if args.memory_budget_mb else None
    return IndexConfig(
        factory=args.factory,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        memory_budget=budget,
        target_recall=args.target_recall,
    )


def _add_index_options(p: argparse.ArgumentParser, *, default: str | None) -> None:
    p.add_argument(
        "--factory",
        default=default,
        help="FAISS index_factory string, or 'auto': exact Flat while small, IVF-SQ8 with an exact refine when "
        "large" + (" (default: auto)" if default else " (default: keep the current one)"),
    )
    p.add_argument(
        "--memory-budget-mb", type=float, help="index RAM budget for 'auto' (default: max(512, 1/3 of the vectors))"
    )
    p.add_argument(
        "--target-recall", type=float, default=0.95, help="Recall@10 vs exact that nprobe/efSearch are tuned to"
    )
    p.add_argument("--nprobe", type=int, help="fix IVF nprobe instead of tuning it")
    p.add_argument("--ef-search", type=int, help="fix HNSW efSearch instead of tuning it")


def _shown(text: object) -> str:
    """Text for a terminal: control characters (escape codes included) written as escapes, never sent raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _print_hits(query: str, hits: Sequence[Any]) -> None:
    print(f"\nquery: {_shown(query)}")
    for rank, h in enumerate(hits, 1):
        meta = f"  {json.dumps(h.metadata, ensure_ascii=False)}" if h.metadata else ""
        print(f"  {rank:>2}. {h.score:.4f}  [{_shown(h.id)}] {_shown(h.title)}{_shown(meta)}")


def _cmd_search(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from matching import Matcher
    from matching.store import parse_where

    where = parse_where(args.where) if args.where else None
    with Matcher.load(args.bundle, model=args.model, preset=getattr(args, "preset", None)) as matcher:
        results = matcher.search_batch(
            args.query, args.k, candidates=args.candidates, rerank=not args.no_rerank, where=where,
            retrieval=args.retrieval,
        )  # fmt: skip
    if args.json:
        payload = [
            {"query": q, "matches": [asdict(h) for h in hits]} for q, hits in zip(args.query, results, strict=True)
        ]
        print(json.dumps(payload if len(payload) > 1 else payload[0], ensure_ascii=False, indent=2))
    else:
        for q, hits in zip(args.query, results, strict=True):
            _print_hits(q, hits)
    return 0


def _print_change(bundle: str, report: Any) -> None:
    parts = [
        f"{name.replace('_', ' ')} {getattr(report, name)}"
        for name in ("added", "updated", "metadata_updated", "unchanged", "removed", "missing")
        if getattr(report, name)
    ]
    done = ", ".join(parts) or "no changes"
    print(
        f"{report.operation} {bundle}: {done}; {report.encoded} titles encoded; "
        f"{report.count} titles now ({report.generation}, {report.seconds:.1f} s)"
    )


def _writer(args: argparse.Namespace) -> Any:
    """The bundle opened for a change; files are not re-hashed first (GBs at 1M titles; `info --verify` does it)."""
    from matching import Matcher

    preset = getattr(args, "preset", None)
    return Matcher.load(args.bundle, model=args.model, preset=preset, verify=False, lock_timeout=args.lock_timeout)


def _cmd_change(args: argparse.Namespace) -> int:

    with _writer(args) as matcher:
        change = matcher.add if args.command == "add" else matcher.upsert
        report = change(
            args.source,
            id_column=args.id_column,
            title_column=args.title_column,
            skip_bad_rows=args.skip_bad_rows,
            encoding=args.encoding,
            show_progress=not args.quiet,
        )
    _print_change(args.bundle, report)
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from matching.errors import InputFileError

    ids = list(args.ids)
    if args.ids_file:
        try:
            text = Path(args.ids_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputFileError(f"cannot read --ids-file {args.ids_file!r}: {exc}") from None
        ids += [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        from matching.errors import ConfigError

        raise ConfigError("give the ids to remove as arguments or with --ids-file (one per line)")
    with _writer(args) as matcher:
        report = matcher.remove(ids, missing_ok=args.missing_ok)
    _print_change(args.bundle, report)
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:

    options = (args.factory, args.nprobe, args.ef_search, args.memory_budget_mb)
    config = _index_config(args) if any(o is not None for o in options) else None
    with _writer(args) as matcher:
        if config is not None and args.factory is None:  # a new setting for the current kind of index
            config = dataclasses.replace(config, factory=matcher.index.config.factory)
        report = matcher.compact(index_config=config, show_progress=not args.quiet)
        factory = matcher.manifest.factory
    done = f"{report.count} titles, index {factory}"
    print(f"compacted {args.bundle}: {done} ({report.generation}, {report.seconds:.1f} s)")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from matching import Matcher

    bundle = Path(args.bundle)
    out = Path(args.out) if args.out else bundle.parent / f"{bundle.name}-student-L{args.layers}"
    show = not args.quiet
    with Matcher.load(bundle, model=args.model, verify=False) as matcher:
        report = matcher.distill(out, layers=args.layers, max_titles=args.max_titles, epochs=args.epochs,
                                 show_progress=show)  # fmt: skip
        print(
            f"distilled a {args.layers}-layer student into {out} in {report.seconds:.0f} s: cosine to the teacher "
            f"on {report.held_out_texts} held-out titles {report.cosine_before:.4f} -> {report.cosine_after:.4f}"
        )
        if args.rebuild:
            rebuilt = Matcher.build(matcher.catalogue(), args.rebuild, model=out, preset=args.preset,
                                    overwrite=args.overwrite, show_progress=show)  # fmt: skip
            print(
                f"built {args.rebuild}: {len(rebuilt)} titles encoded by the student, index {rebuilt.manifest.factory}"
            )
            rebuilt.close()
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from matching import Matcher
    from matching.evaluate import evaluate, load_qrels, load_queries

    queries, qrels = load_queries(args.queries), load_qrels(args.qrels)
    with Matcher.load(args.bundle, model=args.model, preset=getattr(args, "preset", None)) as matcher:
        report = evaluate(matcher, queries, qrels, k_values=args.k, candidates=args.candidates)
    if args.json:
        print(
            json.dumps(
                {
                    "queries": report.queries,
                    "retrieval": report.retrieval,
                    "reranked": report.reranked,
                    "columns": report.columns,
                },
                indent=2,
            )
        )
    else:
        print(report.table())
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from matching import Matcher
    from matching.pairs import score_file

    with Matcher.load(args.bundle, model=args.model, preset=getattr(args, "preset", None)) as matcher:
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


def _cmd_train(args: argparse.Namespace) -> int:
    from matching import Matcher
    from matching.training.scorer import search_scorer

    columns = {
        "query_column": args.query_column,
        "title_column": args.title_column,
        "label_column": args.label_column,
    }
    show = not args.quiet
    with Matcher.load(args.bundle, model=args.model, preset=getattr(args, "preset", None)) as matcher:
        if args.query_tower:
            report = matcher.train_query_tower(args.pairs, args.valid, show_progress=show, seed=args.seed, **columns)
            print("query tower:\n" + report.table())
        settings: dict[str, Any] = {**columns, "seed": args.seed, "hard_negatives": args.hard_negatives}
        for name in ("epochs", "lr", "hidden", "dropout", "loss"):
            if getattr(args, name) is not None:
                settings[name] = getattr(args, name)
        if args.search:
            scorer, report, search = search_scorer(
                matcher.snapshot, args.pairs, args.valid, trials=args.search, show_progress=show, **settings
            )
            print(search.table())
            matcher.replace_scorer(scorer, {**report.to_dict(), "search": search.to_dict()})
        else:
            report = matcher.train_scorer(args.pairs, args.valid, show_progress=show, **settings)
        print("scorer:\n" + report.table())
        print(f"saved into {args.bundle}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from matching.bundle import current_generation, read_manifest

    gen = current_generation(Path(args.bundle))
    info = {
        "path": str(args.bundle),
        "generation": gen.name,
        **read_manifest(gen, verify=args.verify).to_dict(),
    }
    if not args.files:
        info.pop("files")
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from matching import Matcher

    names = ("epochs", "lr", "batch_size", "loss", "seed", "query_column", "title_column", "label_column")
    settings = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    with Matcher.load(args.bundle, verify=False) as m:
        before = m.manifest.encoder.get("fingerprint")
        report = m.finetune(
            args.pairs, args.valid, search=args.search or 0, retrain_scorer=not args.keep_scorer_reset,
            show_progress=not args.quiet, **settings,
        )  # fmt: skip
        print(report.table())
        if report.best_epoch == 0:
            print(f"no validation beat the starting encoder: {args.bundle} is unchanged")
        else:
            scorer = "retrained on the same pairs" if report.scorer_report else "reset (train it again)"
            after = m.manifest.encoder.get("fingerprint")
            print(f"re-encoded {args.bundle}: {len(m)} titles, encoder {before} -> {after}, {m.generation}; "
                  f"the reranker was {scorer}")  # fmt: skip
    return 0


def _cmd_reencode(args: argparse.Namespace) -> int:
    from matching import Matcher

    with Matcher.load(args.bundle, verify=False) as m:
        before = m.manifest.encoder.get("fingerprint")
        m.reencode(args.model, preset=args.preset, show_progress=not args.quiet)
        print(
            f"re-encoded {args.bundle}: {len(m)} titles, encoder {before} -> {m.manifest.encoder.get('fingerprint')}, "
            f"index {m.manifest.factory}, {m.generation}; the reranker was reset (train it again)"
        )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from matching.config import ServiceConfig
    from matching.errors import ConfigError

    try:
        from matching import service
    except ImportError:
        raise ConfigError("matching serve needs FastAPI and uvicorn: pip install 'matching[serve]'") from None
    print(f"serving {args.bundle} on http://{args.host}:{args.port}/ (API docs at /docs)", file=sys.stderr)
    service.serve(
        args.bundle, host=args.host, port=args.port, workers=args.workers, token_file=args.token_file,
        config=ServiceConfig(torch_threads=args.torch_threads), log_level=args.log_level,
    )  # fmt: skip
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from matching.demo import run_demo

    run_demo(Path(args.out), size=args.size, show_progress=not args.quiet)
    return 0


PRESET_HELP = (
    "encoder speed/precision: exact (float32), default (bf16 where the CPU has it; within 0.3 nDCG points), "
    "fast (default + texts cut at 192 tokens + int8 single queries); presets of one model share the vector space"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matching", description="Two-tower semantic matching over a title catalogue.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("build", help="encode a CSV/TSV/JSONL/Parquet catalogue into a new index bundle")
    p.add_argument(
        "source", help="catalogue file (.csv, .tsv, .jsonl, maybe compressed; .parquet), or a directory or glob of them"
    )
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="where to read and encode")
    p.add_argument("--ray-address", help="Ray cluster to use with --engine ray (default: start a local one)")
    p.add_argument("--encoders", type=int, help="encoder actors with --engine ray (default: one per GPU, else CPUs/4)")
    p.add_argument("--out", help="bundle directory (default: indexes/<file stem>)")
    p.add_argument(
        "--analyzer", choices=["auto", "english", "chinese", "cjk", "standard"], default="auto",
        help="how titles are cut into words for BM25 (default: from the titles' script)",
    )  # fmt: skip
    p.add_argument(
        "--retrieval", choices=["hybrid", "dense", "lexical"],
        help="the bundle's default retrieval (default: hybrid, dense and BM25 candidates fused)",
    )  # fmt: skip
    p.add_argument("--id-column", default="id")
    p.add_argument(
        "--title-column",
        nargs="+",
        default=["title"],
        help="title column; several are joined with a space (e.g. --title-column title text)",
    )
    p.add_argument("--model", help="local BERT-family checkpoint directory (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--pooling", choices=["mean", "cls"], help="default: what the checkpoint says, else mean")
    p.add_argument("--max-length", type=int, help="token limit per title (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--preset", choices=["exact", "default", "fast"], default="default", help=PRESET_HELP)
    _add_index_options(p, default="auto")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip rows with an empty id or title")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the file (default: utf-8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("search", help="print the best matches for one or more queries")
    p.add_argument("bundle")
    p.add_argument("query", nargs="+")
    p.add_argument("-k", type=int, default=10, help="matches per query (default 10)")
    p.add_argument("--candidates", type=int, default=100, help="FAISS candidates to rerank (default 100)")
    p.add_argument("--no-rerank", action="store_true", help="rank by the retrieval score alone")
    p.add_argument(
        "--retrieval", choices=["hybrid", "dense", "lexical"],
        help="how candidates are found (default: the bundle's, hybrid unless built otherwise)",
    )  # fmt: skip
    p.add_argument("--model", help="override the encoder directory recorded in the bundle")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--preset", choices=["exact", "default", "fast"], help=PRESET_HELP)
    p.add_argument(
        "--where",
        action="append",
        metavar="EXPR",
        help="metadata filter applied inside retrieval, repeatable: brand=acme, 'price<50', "
        '\'color in ["red", "blue"]\' (values are JSON where they parse)',
    )
    p.set_defaults(func=_cmd_search)

    for name, text in (
        ("add", "encode and add new titles (an id already in the bundle is an error)"),
        ("upsert", "add new titles and replace changed ones (same id); only changed titles are encoded"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("bundle")
        p.add_argument("source", help="catalogue file (.csv, .tsv, .jsonl; may be compressed)")
        p.add_argument("--id-column", help="default: the one the bundle was built with")
        p.add_argument("--title-column", nargs="+", help="default: the one(s) the bundle was built with")
        p.add_argument("--skip-bad-rows", action="store_true", help="skip rows with an empty id or title")
        p.add_argument("--encoding", default="utf-8")
        p.add_argument("--model", help="override the encoder directory recorded in the bundle")
        p.add_argument("--lock-timeout", type=float, default=30.0, help="seconds to wait for another writer")
        p.add_argument("--preset", choices=["exact", "default", "fast"], help=PRESET_HELP)
        p.add_argument("-q", "--quiet", action="store_true")
        p.set_defaults(func=_cmd_change)

    p = sub.add_parser("remove", help="remove titles by id")
    p.add_argument("bundle")
    p.add_argument("ids", nargs="*", help="external ids to remove")
    p.add_argument("--ids-file", help="a text file with one id per line")
    p.add_argument("--missing-ok", action="store_true", help="ignore ids that are not in the bundle")
    p.add_argument("--model", help="override the encoder directory recorded in the bundle")
    p.add_argument("--lock-timeout", type=float, default=30.0)
    p.set_defaults(func=_cmd_remove)

    p = sub.add_parser("compact", help="drop removed rows and rebuild the index from stored vectors (no re-encoding)")
    p.add_argument("bundle")
    _add_index_options(p, default=None)
    p.add_argument("--model", help="override the encoder directory recorded in the bundle")
    p.add_argument("--lock-timeout", type=float, default=30.0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_compact)

    p = sub.add_parser("evaluate", help="Recall@k / MRR@10 / nDCG@10 on a BEIR-layout query set")
    p.add_argument("bundle")
    p.add_argument("--queries", required=True, help="queries.jsonl ({_id, text} per line)")
    p.add_argument("--qrels", required=True, help="qrels TSV (query-id, corpus-id, score; with header)")
    p.add_argument("-k", type=int, nargs="+", default=[10, 100], help="cut-offs (default: 10 100)")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--preset", choices=["exact", "default", "fast"], help=PRESET_HELP)
    p.add_argument("--model", help="override the encoder directory recorded in the bundle")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("score", help="score (query, title) pairs from a CSV/TSV into a new file")
    p.add_argument("bundle")
    p.add_argument("pairs", help="CSV/TSV with a query and a title column (other columns are kept)")
    p.add_argument("--out", required=True, help="output CSV/TSV: the input rows plus score and cosine")
    p.add_argument("--query-column", default="query")
    p.add_argument("--title-column", default="title")
    p.add_argument("--chunksize", type=int, default=20_000)
    p.add_argument("--preset", choices=["exact", "default", "fast"], help=PRESET_HELP)
    p.add_argument("--model", help="override the encoder directory recorded in the bundle")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("train", help="train the reranker (and optionally a query tower) on labelled pairs")
    p.add_argument("bundle")
    p.add_argument("pairs", help="CSV/TSV/JSONL with query, title and label (0/1 or graded) columns")
    p.add_argument("--valid", help="validation pairs (default: 10%% of the training queries)")
    p.add_argument(
        "--hard-negatives", type=int, default=None,
        help="negatives mined per query from the bundle (default: 20 for positives-only pairs, else none)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--hidden", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--loss", choices=["auto", "listwise", "bce", "mse", "cosent"])
    p.add_argument("--search", type=int, metavar="TRIALS", help="random hyper-parameter search with N trials")
    p.add_argument("--query-tower", action="store_true", help="first fine-tune a separate query encoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query-column", default="query")
    p.add_argument("--title-column", default="title")
    p.add_argument("--label-column", default="label")
    p.add_argument("--model", help="override the encoder directory recorded in the bundle")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("finetune", help="fine-tune the encoder on labelled pairs, then re-encode the bundle")
    p.add_argument("bundle")
    p.add_argument("pairs", help="CSV/TSV/JSONL with query, title and label (positives only, 0/1 or graded)")
    p.add_argument("--valid", help="validation pairs for early stopping (default: 10%% of the training queries)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--loss", choices=["auto", "mnrl", "cosent"])
    p.add_argument("--search", type=int, metavar="TRIALS", help="random hyper-parameter search with N trials")
    p.add_argument("--keep-scorer-reset", action="store_true", help="do not retrain the reranker afterwards")
    p.add_argument("--seed", type=int)
    for column in ("query", "title", "label"):
        p.add_argument(f"--{column}-column")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("distill", help="train a smaller N-layer student encoder on the bundle's own titles")
    p.add_argument("bundle")
    p.add_argument("--layers", type=int, default=3, help="student layers, the teacher's first N (default 3)")
    p.add_argument("--out", help="student checkpoint directory (default: <bundle>-student-L<N> beside the bundle)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-titles", type=int, default=100_000, help="titles to train on (a random sample)")
    p.add_argument("--rebuild", metavar="BUNDLE", help="then build this new bundle with the student")
    p.add_argument("--preset", choices=["exact", "default", "fast"], help=PRESET_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --rebuild bundle")
    p.add_argument("--model", help="override the encoder directory recorded in the bundle")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("info", help="print a bundle's manifest")
    p.add_argument("bundle")
    p.add_argument("--verify", action="store_true", help="also check every file's checksum")
    p.add_argument("--files", action="store_true", help="list the files and their checksums")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("reencode", help="switch a bundle to another encoder: re-encode every title, zero downtime")
    p.add_argument("bundle")
    p.add_argument(
        "--model", help="checkpoint directory of the new encoder (default: the bundle's own, e.g. for --preset)"
    )
    p.add_argument("--preset", choices=["exact", "default", "fast"], help=PRESET_HELP)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_reencode)

    p = sub.add_parser("serve", help="serve a bundle over HTTP: JSON search/score/write API and a search page")
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own copy of the model")
    p.add_argument("--token-file", help="file holding the bearer token that POST /add, /upsert, /remove need")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="build a demo bundle from a generated catalogue and query it")
    p.add_argument("--out", default="indexes/demo")
    p.add_argument("--size", type=int, default=3000, help="number of generated titles")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # text that cannot be encoded for the terminal (a path of non-UTF-8 bytes, a lone surrogate) is escaped
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from matching import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from matching.errors import MatchingError

    try:
        return int(args.func(args))
    except MatchingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # outside a bundle write (which says more): a path that cannot be read or written
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
