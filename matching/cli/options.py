"""Options several commands share, written once, and terminal output helpers. Imports nothing heavy."""

from __future__ import annotations

import argparse

PRESETS = ("exact", "default", "fast")
PRESET_HELP = (
    "encoder speed/precision: exact (float32), default (bf16 where the CPU has it; within 0.3 nDCG points), "
    "fast (default + texts cut at 192 tokens + int8 single queries); presets of one model share the vector space"
)
MODEL_OVERRIDE_HELP = "override the encoder directory recorded in the bundle"
# seconds a writer waits for another one: matching.bundle.DEFAULT_LOCK_TIMEOUT (not imported here: it pulls in
# SQLAlchemy, and `matching --help` stays instant; tests/test_cli.py checks the two agree)
LOCK_TIMEOUT = 30.0
RETRIEVALS = ("hybrid", "dense", "lexical")


def add_preset(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
    p.add_argument("--preset", choices=PRESETS, default=default, help=PRESET_HELP)


def add_model(p: argparse.ArgumentParser, text: str = MODEL_OVERRIDE_HELP) -> None:
    p.add_argument("--model", help=text)


def add_lock_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=LOCK_TIMEOUT,
        help=f"seconds to wait for another writer (default {LOCK_TIMEOUT:g})",
    )


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_skip_bad_rows(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-rows", action="store_true", help="skip rows with an empty id or title")


def shown(text: object) -> str:
    """Text for a terminal: control characters (escape codes included) written as escapes, never sent raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
