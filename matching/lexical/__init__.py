"""Lexical engines behind one protocol (:class:`LexicalIndex`, BM25 scoring); a new backend is one module here plus
one :func:`register` line below."""

from matching.lexical.base import (
    DEFAULT_PARAMS,
    BM25Params,
    LexicalIndex,
    TermStats,
    lexical_backend,
    lexical_backends,
    lexical_files,
    register,
)
from matching.lexical.bm25 import BM25Index

register("bm25", BM25Index)

__all__ = [
    "DEFAULT_PARAMS",
    "BM25Index",
    "BM25Params",
    "LexicalIndex",
    "TermStats",
    "lexical_backend",
    "lexical_backends",
    "lexical_files",
    "register",
]
