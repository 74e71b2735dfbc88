"""Commands that write a bundle's catalogue: build, add, upsert, remove, compact, reencode."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from matching.analysis import Analyzer
from matching.cli.options import (
    RETRIEVALS,
    add_lock_timeout,
    add_model,
    add_preset,
    add_quiet,
    add_skip_bad_rows,
)


def add_commands(sub: Any) -> None:
    """Add this family's subparsers to ``sub`` (the result of ``add_subparsers``)."""
    _add_build(sub)
    _add_changes(sub)
    _add_remove(sub)
    _add_compact(sub)
    _add_reencode(sub)


# -- parsers -------------------------------------------------------------------------------------------


def _add_build(sub: Any) -> None:
    p = sub.add_parser("build", help="encode a CSV/TSV/JSONL/Parquet catalogue into a new index bundle")
    p.add_argument(
        "source", help="catalogue file (.csv, .tsv, .jsonl, maybe compressed; .parquet), or a directory or glob of them"
    )
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="where to read and encode")
    p.add_argument("--ray-address", help="Ray cluster to use with --engine ray (default: start a local one)")
    p.add_argument(
        "--encoders", type=int, help="encoder actors with --engine ray (default: one per GPU, else one per CPU)"
    )
    p.add_argument("--out", help="bundle directory (default: indexes/<file stem>)")
    p.add_argument(
        "--analyzer",
        choices=[a.value for a in Analyzer],
        default="auto",
        help="how titles are cut into words for BM25 (default: from the titles' script)",
    )
    p.add_argument(
        "--retrieval",
        choices=RETRIEVALS,
        help="the bundle's default retrieval (default: hybrid, dense and BM25 candidates fused)",
    )
    p.add_argument(
        "--index-field",
        action="append",
        metavar="FIELD",
        help="a metadata field to index for fast --where filters (repeat; then only these are indexed); "
        "'none' for none (default: numbers and texts of at most 65,536 distinct values, at most 32 fields)",
    )
    p.add_argument("--id-column", default="id")
    p.add_argument(
        "--title-column",
        nargs="+",
        default=["title"],
        help="title column; several are joined with a space (e.g. --title-column title text)",
    )
    add_model(p, "local BERT-family checkpoint directory (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--pooling", choices=["mean", "cls"], help="default: what the checkpoint says, else mean")
    p.add_argument("--max-length", type=int, help="token limit per title (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64)
    add_preset(p, default="default")
    _add_index_options(p, default="auto")
    add_skip_bad_rows(p)
    p.add_argument("--encoding", default="utf-8", help="text encoding of the file (default: utf-8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    add_quiet(p)
    p.set_defaults(func=_cmd_build)


def _add_changes(sub: Any) -> None:
    for name, text in (
        ("add", "encode and add new titles (an id already in the bundle is an error)"),
        ("upsert", "add new titles and replace changed ones (same id); only changed titles are encoded"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("bundle")
        p.add_argument("source", help="catalogue file (.csv, .tsv, .jsonl; may be compressed)")
        p.add_argument("--id-column", help="default: the one the bundle was built with")
        p.add_argument("--title-column", nargs="+", help="default: the one(s) the bundle was built with")
        add_skip_bad_rows(p)
        p.add_argument("--encoding", default="utf-8")
        add_model(p)
        add_lock_timeout(p)
        add_preset(p)
        add_quiet(p)
        p.set_defaults(func=_cmd_change)


def _add_remove(sub: Any) -> None:
    p = sub.add_parser("remove", help="remove titles by id")
    p.add_argument("bundle")
    p.add_argument("ids", nargs="*", help="external ids to remove")
    p.add_argument("--ids-file", help="a text file with one id per line")
    p.add_argument("--missing-ok", action="store_true", help="ignore ids that are not in the bundle")
    add_model(p)
    add_lock_timeout(p)
    p.set_defaults(func=_cmd_remove)


def _add_compact(sub: Any) -> None:
    p = sub.add_parser("compact", help="drop removed rows and rebuild the index from stored vectors (no re-encoding)")
    p.add_argument("bundle")
    _add_index_options(p, default=None)
    add_model(p)
    add_lock_timeout(p)
    add_quiet(p)
    p.set_defaults(func=_cmd_compact)


def _add_reencode(sub: Any) -> None:
    p = sub.add_parser("reencode", help="switch a bundle to another encoder: re-encode every title, zero downtime")
    p.add_argument("bundle")
    add_model(p, "checkpoint directory of the new encoder (default: the bundle's own, e.g. for --preset)")
    add_preset(p)
    add_quiet(p)
    p.set_defaults(func=_cmd_reencode)


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
    p.add_argument(
        "--index-backend",
        help="vector index backend: faiss, or exact (NumPy brute force; small catalogues)"
        + (" (default: faiss)" if default else " (default: keep the current one)"),
    )
    p.add_argument("--nprobe", type=int, help="fix IVF nprobe instead of tuning it")
    p.add_argument("--ef-search", type=int, help="fix HNSW efSearch instead of tuning it")


# -- commands ------------------------------------------------------------------------------------------


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
        index_fields="none" if args.index_field == ["none"] else args.index_field,
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
        **({"backend": args.index_backend} if args.index_backend else {}),
    )


def _print_change(bundle: str, report: Any) -> None:
    parts = [
        f"{name.replace('_', ' ')} {getattr(report, name)}"
        for name in ("added", "updated", "metadata_updated", "unchanged", "removed", "missing")
        if getattr(report, name)
    ]
    done = ", ".join(parts) or "no changes"
    if not report.published:
        print(f"{report.operation} {bundle}: {done}; nothing to publish, {report.generation} stays live")
        return
    print(
        f"{report.operation} {bundle}: {done}; {report.encoded} titles encoded; "
        f"{report.count} titles now ({report.generation}, {report.seconds:.1f} s)"
        + ("; the changes since the last full write were folded into new base files" if report.folded else "")
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
    from matching.errors import ConfigError, InputFileError

    ids = list(args.ids)
    if args.ids_file:
        try:
            text = Path(args.ids_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputFileError(f"cannot read --ids-file {args.ids_file!r}: {exc}") from None
        ids += [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise ConfigError("give the ids to remove as arguments or with --ids-file (one per line)")
    with _writer(args) as matcher:
        report = matcher.remove(ids, missing_ok=args.missing_ok)
    _print_change(args.bundle, report)
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:
    options = (args.factory, args.nprobe, args.ef_search, args.memory_budget_mb, args.index_backend)
    config = _index_config(args) if any(o is not None for o in options) else None
    with _writer(args) as matcher:
        if config is not None and args.factory is None:  # a new setting for the current kind of index
            config = dataclasses.replace(config, factory=matcher.index.config.factory)
        if config is not None and args.index_backend is None:
            config = dataclasses.replace(config, backend=matcher.index.config.backend)
        report = matcher.compact(index_config=config, show_progress=not args.quiet)
        factory = matcher.manifest.factory
    done = f"{report.count} titles, index {factory}"
    print(f"compacted {args.bundle}: {done} ({report.generation}, {report.seconds:.1f} s)")
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
