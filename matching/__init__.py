"""matching: two-tower semantic matching (BERT title cache + FAISS + a small DNN reranker)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from matching.config import EncoderConfig, IndexConfig, ScorerConfig
from matching.errors import (
    BadRowError,
    BundleError,
    BundleLockedError,
    ConfigError,
    DeadlineError,
    DuplicateIdError,
    InputFileError,
    MatchingError,
    ModelError,
    SchemaError,
)
from matching.types import ChangeReport, Match, Pooling

__version__ = "0.1.0"

if TYPE_CHECKING:
    from matching.matcher import Matcher


def __getattr__(name: str) -> Any:
    # Matcher pulls in torch, transformers and FAISS: import it on first use so `matching --help` is instant.
    if name == "Matcher":
        from matching.matcher import Matcher

        return Matcher
    raise AttributeError(f"module 'matching' has no attribute {name!r}")


__all__ = [
    "BadRowError",
    "BundleError",
    "BundleLockedError",
    "ChangeReport",
    "ConfigError",
    "DeadlineError",
    "DuplicateIdError",
    "EncoderConfig",
    "IndexConfig",
    "InputFileError",
    "Match",
    "Matcher",
    "MatchingError",
    "ModelError",
    "Pooling",
    "SchemaError",
    "ScorerConfig",
    "__version__",
]
