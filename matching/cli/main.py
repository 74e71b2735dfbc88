"""The parser, assembled from the command families, and :func:`main`, which runs one command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from matching.cli import build, ops, search, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matching", description="Two-tower semantic matching over a title catalogue.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for family in (build, search, train, ops):
        family.add_commands(sub)
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
