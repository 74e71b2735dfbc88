"""Commands that learn from pairs or from the bundle's own titles: train, finetune, distill."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from matching.cli.options import add_model, add_preset, add_quiet


def add_commands(sub: Any) -> None:
    """Add this family's subparsers to ``sub`` (the result of ``add_subparsers``)."""
    _add_train(sub)
    _add_finetune(sub)
    _add_distill(sub)


# -- parsers -------------------------------------------------------------------------------------------


def _add_search_trials(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", type=int, metavar="TRIALS", help="random hyper-parameter search with N trials")


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train the reranker (and optionally a query tower) on labelled pairs")
    p.add_argument("bundle")
    p.add_argument("pairs", help="CSV/TSV/JSONL with query, title and label (0/1 or graded) columns")
    p.add_argument("--valid", help="validation pairs (default: 10%% of the training queries)")
    p.add_argument(
        "--hard-negatives",
        type=int,
        default=None,
        help="negatives mined per query from the bundle (default: 20 with the listwise loss, which positives-only "
        "pairs get; else none)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--hidden", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--loss", choices=["auto", "listwise", "bce", "mse", "cosent"])
    p.add_argument(
        "--residual-share",
        type=float,
        help="the learned residual's share in the published score, the rest the untrained one's (default 0.5)",
    )
    _add_search_trials(p)
    p.add_argument("--query-tower", action="store_true", help="first fine-tune a separate query encoder")
    p.add_argument("--seed", type=int, default=0)
    for column in ("query", "title", "label"):
        p.add_argument(f"--{column}-column", default=column)
    add_model(p)
    add_quiet(p)
    p.set_defaults(func=_cmd_train)


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune the encoder on labelled pairs, then re-encode the bundle")
    p.add_argument("bundle")
    p.add_argument("pairs", help="CSV/TSV/JSONL with query, title and label (positives only, 0/1 or graded)")
    p.add_argument("--valid", help="validation pairs for early stopping (default: 10%% of the training queries)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--loss", choices=["auto", "mnrl", "cosent"])
    p.add_argument(
        "--mix",
        type=float,
        help="the fine-tuned weights' share, the rest the starting ones' (default 0.7; 1: the whole fine-tune)",
    )
    _add_search_trials(p)
    p.add_argument("--keep-scorer-reset", action="store_true", help="leave the reranker reset (not retrained)")
    p.add_argument("--residual-share", type=float, help="the retrained reranker's residual share (default 0.5)")
    p.add_argument("--seed", type=int)
    for column in ("query", "title", "label"):
        p.add_argument(f"--{column}-column")
    add_quiet(p)
    p.set_defaults(func=_cmd_finetune)


def _add_distill(sub: Any) -> None:
    p = sub.add_parser("distill", help="train a smaller N-layer student encoder on the bundle's own titles")
    p.add_argument("bundle")
    p.add_argument("--layers", type=int, default=3, help="student layers, the teacher's first N (default 3)")
    p.add_argument("--out", help="student checkpoint directory (default: <bundle>-student-L<N> beside the bundle)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-titles", type=int, default=100_000, help="titles to train on (a random sample)")
    p.add_argument("--rebuild", metavar="BUNDLE", help="then build this new bundle with the student")
    add_preset(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --rebuild bundle")
    add_model(p)
    add_quiet(p)
    p.set_defaults(func=_cmd_distill)


# -- commands ------------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from matching import Matcher
    from matching.training.scorer import search_scorer

    columns = {
        "query_column": args.query_column,
        "title_column": args.title_column,
        "label_column": args.label_column,
    }
    show = not args.quiet
    with Matcher.load(args.bundle, model=args.model) as matcher:
        if args.query_tower:
            report = matcher.train_query_tower(args.pairs, args.valid, show_progress=show, seed=args.seed, **columns)
            print("query tower:\n" + report.table())
        settings: dict[str, Any] = {**columns, "seed": args.seed, "hard_negatives": args.hard_negatives}
        for name in ("epochs", "lr", "hidden", "dropout", "loss", "residual_share"):
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


def _cmd_finetune(args: argparse.Namespace) -> int:
    from matching import Matcher

    names = ("epochs", "lr", "batch_size", "loss", "mix", "seed", "query_column", "title_column", "label_column")
    settings = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    with Matcher.load(args.bundle, verify=False) as m:
        before = m.manifest.encoder.get("fingerprint")
        report = m.finetune(
            args.pairs,
            args.valid,
            search=args.search or 0,
            retrain_scorer=not args.keep_scorer_reset,
            residual_share=args.residual_share,
            show_progress=not args.quiet,
            **settings,
        )
        print(report.table())
        if report.best_epoch == 0:
            print(f"no validation beat the starting encoder: {args.bundle} is unchanged")
        else:
            scorer = _scorer_outcome(report.scorer_report)
            after = m.manifest.encoder.get("fingerprint")
            print(
                f"re-encoded {args.bundle}: {len(m)} titles, encoder {before} -> {after}, {m.generation}; "
                f"the reranker was {scorer}"
            )
    return 0


def _scorer_outcome(report: dict[str, Any] | None) -> str:
    """What became of the reranker in a fine-tune's generation, in words."""
    if report is None:
        return "reset (train it again)"
    if report["chosen"] == "default":
        return "retrained on the same pairs, but no learned form beat the untrained default: it stays"
    return f"retrained on the same pairs ({report['chosen']})"


def _cmd_distill(args: argparse.Namespace) -> int:
    from matching import Matcher

    bundle = Path(args.bundle)
    out = Path(args.out) if args.out else bundle.parent / f"{bundle.name}-student-L{args.layers}"
    show = not args.quiet
    with Matcher.load(bundle, model=args.model, verify=False) as matcher:
        report = matcher.distill(
            out, layers=args.layers, max_titles=args.max_titles, epochs=args.epochs, show_progress=show
        )
        print(
            f"distilled a {args.layers}-layer student into {out} in {report.seconds:.0f} s: cosine to the teacher "
            f"on {report.held_out_texts} held-out titles {report.cosine_before:.4f} -> {report.cosine_after:.4f}"
        )
        if args.rebuild:
            rebuilt = Matcher.build(
                matcher.catalogue(),
                args.rebuild,
                model=out,
                preset=args.preset,
                overwrite=args.overwrite,
                show_progress=show,
            )
            print(
                f"built {args.rebuild}: {len(rebuilt)} titles encoded by the student, index {rebuilt.manifest.factory}"
            )
            rebuilt.close()
    return 0
