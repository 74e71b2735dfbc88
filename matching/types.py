"""Value types and choices shared across the package."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

ExternalId = str | int


class Pooling(StrEnum):
    """How token vectors become one text vector."""

    MEAN = "mean"
    CLS = "cls"


class IdType(StrEnum):
    """The Python type external ids are handed back as."""

    STR = "str"
    INT = "int"


@dataclass(frozen=True, slots=True)
class Match:
    """One search hit.

    ``score`` is the reranker's score (equal to ``retrieval_score`` while the scorer is untrained);
    ``retrieval_score`` is the cosine similarity FAISS retrieved the title with.
    """

    id: ExternalId
    title: str
    score: float
    retrieval_score: float
    metadata: dict[str, Any] = field(default_factory=dict)
