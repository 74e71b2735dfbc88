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


class Preset(StrEnum):
    """Encoder speed/precision presets (see :mod:`matching.accel` for what each one runs).

    All presets of one checkpoint share its vector space: vectors from any of them can be compared.
    """

    EXACT = "exact"  # float32 eager, the reference
    DEFAULT = "default"  # fastest setting within 0.3 nDCG@10 points of EXACT on SciFact
    FAST = "fast"  # fastest setting within 1.5 nDCG@10 points of EXACT on SciFact


class EncoderLoss(StrEnum):
    """Objective of an encoder fine-tune. ``auto``: ``mnrl`` when every label is positive, else ``cosent``."""

    AUTO = "auto"
    MNRL = "mnrl"  # in-batch + mined negatives (multiple-negatives ranking, InfoNCE) on positive pairs
    COSENT = "cosent"  # pairwise ranking of the batch's pairs by label (0/1 or graded)


class DistillLoss(StrEnum):
    """How a distilled student's vectors are compared with the teacher's (both L2-normalised)."""

    COSINE = "cosine"  # 1 - cosine
    MSE = "mse"  # mean squared error


class Fusion(StrEnum):
    """How the untrained score weighs the cosine against the lexical share (see :mod:`matching.features`)."""

    FIXED = "fixed"  # one dense weight for every pair (bundles built before the adaptive rule)
    ADAPTIVE = "adaptive"  # the dense weight follows how much of the query the encoder reads and the length ratio


class ScorerForm(StrEnum):
    """The trained reranker's residual on the fused score: ``linear`` over the pair's scalar features (cosine,
    lexical features), or ``mlp`` (a hidden layer over them plus a learned weighting of the cosine's terms)."""

    LINEAR = "linear"
    MLP = "mlp"


class Retrieval(StrEnum):
    """How candidates are found: dense vectors, BM25 over words, or both fused (the default)."""

    HYBRID = "hybrid"
    DENSE = "dense"
    LEXICAL = "lexical"


class Engine(StrEnum):
    """Where a build reads and encodes: in this process, or on a Ray cluster (the extra ``matching[ray]``)."""

    LOCAL = "local"
    RAY = "ray"


class FieldKind(StrEnum):
    """What an indexed metadata field's column holds (:mod:`matching.fields`)."""

    NUMBER = "number"
    TEXT = "text"


class IdType(StrEnum):
    """The Python type external ids are handed back as."""

    STR = "str"
    INT = "int"


@dataclass(frozen=True, slots=True)
class Match:
    """One search hit.

    ``score`` is the reranker's score (equal to ``retrieval_score`` while the scorer is untrained);
    ``retrieval_score`` is what retrieval ranked the title by: the cosine (dense), BM25 (lexical), or their fusion
    (hybrid). ``dense_score`` (cosine) and ``lexical_score`` (BM25) are the parts, where computed.
    """

    id: ExternalId
    title: str
    score: float
    retrieval_score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    dense_score: float | None = None
    lexical_score: float | None = None


@dataclass(frozen=True, slots=True)
class ChangeReport:
    """What one catalogue change did. ``encoded`` counts titles that went through the encoder; ``published`` is
    false when nothing changed, and ``generation`` then names the one still live; ``folded``: the change took the
    bundle's delta past its limit and a second generation folded it into new base files (:mod:`matching.delta`)."""

    operation: str
    added: int = 0
    updated: int = 0
    metadata_updated: int = 0
    unchanged: int = 0
    removed: int = 0
    missing: int = 0
    encoded: int = 0
    count: int = 0
    generation: str = ""
    seconds: float = 0.0
    published: bool = True
    folded: bool = False
