"""Command line: a thin argparse layer over the API, one module per command family (``build``: the catalogue
writes; ``search``: search, score, evaluate; ``train``: train, finetune, distill; ``ops``: info, serve, demo),
shared options in ``options`` and the parser and dispatch in ``main``. Heavy imports happen inside each command,
so ``matching --help`` stays instant."""

from matching.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
