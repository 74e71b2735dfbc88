"""Commands that run or describe a bundle: info, serve, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from matching.cli.options import add_quiet


def add_commands(sub: Any) -> None:
    """Add this family's subparsers to ``sub`` (the result of ``add_subparsers``)."""
    _add_info(sub)
    _add_serve(sub)
    _add_demo(sub)


# -- parsers -------------------------------------------------------------------------------------------


def _add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="print a bundle's manifest")
    p.add_argument("bundle")
    p.add_argument("--verify", action="store_true", help="also check every file's checksum")
    p.add_argument("--files", action="store_true", help="list the files and their checksums")
    p.set_defaults(func=_cmd_info)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP: JSON search/score/write API and a search page")
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own copy of the model")
    p.add_argument("--token-file", help="file holding the bearer token that POST /add, /upsert, /remove need")
    p.add_argument(
        "--read-token-file",
        help="file holding a bearer token that every read but /health and /ready then needs (or the write token)",
    )
    p.add_argument("--max-request-tokens", type=int, help="tokens one read may encode (default 8192); past it, a 413")
    p.add_argument(
        "--request-seconds", type=float, help="a read's deadline (default 10): 503 if queued past it, 504 if cut"
    )
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        help="wait up to this long to search concurrent single-query reads as one batch (default 2; 0: off)",
    )
    p.add_argument("--batch-queries", type=int, help="at most this many queries in one such batch (default 32)")
    p.add_argument("--batch-threads", type=int, help="threads searching such batches (default 2)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_serve)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="build a demo bundle from a generated catalogue and query it")
    p.add_argument("--out", default="indexes/demo")
    p.add_argument("--size", type=int, default=3000, help="number of generated titles")
    add_quiet(p)
    p.set_defaults(func=_cmd_demo)


# -- commands ------------------------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    from matching.bundle import current_generation, read_manifest
    from matching.fields import indexed_fields

    gen = current_generation(Path(args.bundle))
    info = {
        "path": str(args.bundle),
        "generation": gen.name,
        **read_manifest(gen, verify=args.verify).to_dict(),
        "indexed_fields": indexed_fields(gen),
    }
    if not args.files:
        info.pop("files")
        info.pop("blocks")
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from matching.config import ServiceConfig
    from matching.errors import ConfigError

    try:
        from matching import service
    except ImportError:
        raise ConfigError("matching serve needs FastAPI and uvicorn: pip install 'matching[serve]'") from None
    names = (
        "torch_threads",
        "max_request_tokens",
        "request_seconds",
        "batch_wait_ms",
        "batch_queries",
        "batch_threads",
    )
    given = {name: getattr(args, name) for name in names}  # unset: ServiceConfig's default
    print(f"serving {args.bundle} on http://{args.host}:{args.port}/ (API docs at /docs)", file=sys.stderr)
    service.serve(
        args.bundle,
        host=args.host,
        port=args.port,
        workers=args.workers,
        token_file=args.token_file,
        read_token_file=args.read_token_file,
        config=ServiceConfig.from_dict({k: v for k, v in given.items() if v is not None}),
        log_level=args.log_level,
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from matching.demo import run_demo

    run_demo(Path(args.out), size=args.size, show_progress=not args.quiet)
    return 0
