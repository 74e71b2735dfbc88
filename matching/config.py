"""Typed configuration with defaults that round-trip through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Self, get_args, get_type_hints

from matching.errors import ConfigError
from matching.types import Fusion, Pooling, Preset, ScorerForm


class JsonConfig:
    """Mixin: ``to_dict``/``from_dict``/``save``/``load`` for flat dataclasses of JSON-able fields."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, StrEnum) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(names)}")
        hints = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            # `Pooling | None` and the like: look through the union for the enum or base type
            allowed = [t for t in (get_args(hints[name]) or (hints[name],)) if isinstance(t, type)]
            if value is None and type(None) in allowed:
                kwargs[name] = value
                continue
            enum = next((t for t in allowed if issubclass(t, StrEnum)), None)
            if enum is not None:
                try:
                    value = enum(value)
                except ValueError:
                    choices = [m.value for m in enum]
                    raise ConfigError(f"{cls.__name__}.{name}: {value!r} is not one of {choices}") from None
            elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not any(isinstance(value, t) for t in allowed) or (isinstance(value, bool) and bool not in allowed):
                expected = " | ".join(t.__name__ for t in allowed)
                raise ConfigError(f"{cls.__name__}.{name}: {value!r} is not of type {expected}")
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Self:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class EncoderConfig(JsonConfig):
    """How texts are turned into vectors.

    ``model`` is a local checkpoint directory; ``None`` means the bundled all-MiniLM-L6-v2.
    ``pooling`` and ``max_length`` default to what the checkpoint's sentence-transformers files say
    (mean pooling, the model's own limit) when left ``None``. ``preset`` trades precision for speed
    (:class:`~matching.types.Preset`: ``exact`` float32, ``default``, ``fast``); every preset of one
    checkpoint encodes into the same vector space, so it may differ between building and querying.
    """

    model: str | None = None
    pooling: Pooling | None = None
    max_length: int | None = None
    batch_size: int = 64
    device: str | None = None
    preset: Preset = Preset.DEFAULT

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")


@dataclass(frozen=True)
class IndexConfig(JsonConfig):
    """The vector index. ``backend`` names a registered backend (:mod:`matching.vectors`: ``faiss``, the default,
    or ``exact``); the rest is read by the FAISS backend. ``factory`` is a ``faiss.index_factory`` string, or
    ``"auto"``; inner product always.

    ``auto`` picks the index from the catalogue size and ``memory_budget`` (bytes; default: the larger of
    512 MiB and a third of the float32 vectors): exact ``Flat`` while small, ``IVF<n>,SQ8`` (or smaller codes
    for a tight budget) above about 44k titles at dim 384. Lossy codes are re-scored exactly on the stored
    vectors: ``refine_factor`` x the candidates are fetched. With ``target_recall`` set and ``nprobe`` /
    ``ef_search`` left unset, the search parameter is tuned at build time to reach that Recall@10 of the exact
    search. A bundle records the resolved factory and parameters.
    """

    factory: str = "auto"
    nprobe: int | None = None
    ef_search: int | None = None
    refine_factor: int | None = None
    memory_budget: int | None = None
    target_recall: float | None = 0.95
    backend: str = "faiss"  # an index record without it is a FAISS one

    def __post_init__(self) -> None:
        for name in ("nprobe", "ef_search", "refine_factor", "memory_budget"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 when set, got {value}")
        if self.target_recall is not None and not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(f"target_recall must be in (0, 1] when set, got {self.target_recall}")


@dataclass(frozen=True)
class ScorerConfig(JsonConfig):
    """The MLP reranker's shape. ``dim`` is the vector dimension; the rest size the hidden layer.

    With ``lexical`` (every bundle built since the hybrid retrieval), the MLP also sees lexical features of the pair
    and its base score is the fusion ``dense_weight * cosine + (1 - dense_weight) * normalised BM25``; without it
    (older bundles), the base score is the cosine alone.
    """

    dim: int
    hidden: int = 256
    dropout: float = 0.1
    lexical: bool = False
    dense_weight: float = 1.0  # FIXED: the dense weight; ADAPTIVE: its ceiling
    dense_floor: float = 0.5  # ADAPTIVE: the share of the ceiling at length ratio 0 (0.5: the first rule's)
    dense_span: float = 0.0  # ADAPTIVE: the floor rises below this many distinct terms (0: no lift, as before)
    known_power: float = 1.0  # ADAPTIVE: the power of the query's known-token share in the dense weight
    fusion: Fusion = Fusion.FIXED
    form: ScorerForm = ScorerForm.MLP

    def __post_init__(self) -> None:
        if self.dim < 1 or self.hidden < 1:
            raise ConfigError(f"dim and hidden must be >= 1, got dim={self.dim}, hidden={self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.dense_weight <= 1.0 or (not self.lexical and self.dense_weight != 1.0):
            raise ConfigError(f"dense_weight must be in [0, 1] (1 without lexical features), got {self.dense_weight}")
        if not 0.0 <= self.dense_floor <= 1.0:
            raise ConfigError(f"dense_floor must be in [0, 1], got {self.dense_floor}")
        if not 0.0 <= self.dense_span <= 1e6 or (self.dense_span and self.fusion is not Fusion.ADAPTIVE):
            raise ConfigError(
                f"dense_span must be in [0, 1e6] and 0 without the adaptive fusion, got {self.dense_span}"
            )
        if not 1.0 <= self.known_power <= 10.0 or (self.known_power != 1.0 and self.fusion is not Fusion.ADAPTIVE):
            raise ConfigError(
                f"known_power must be in [1, 10] and 1 without the adaptive fusion, got {self.known_power}"
            )
        if self.fusion is Fusion.ADAPTIVE and not self.lexical:
            raise ConfigError("the adaptive fusion needs lexical features (lexical=True)")


@dataclass(frozen=True)
class ServiceConfig(JsonConfig):
    """Bounds and settings of the search service (``matching serve``): a request past a bound gets a 4xx."""

    max_k: int = 1000
    max_candidates: int = 10_000
    max_query_chars: int = 2000
    max_batch: int = 256  # queries in one POST /search, rows in one write
    max_pairs: int = 10_000  # pairs in one POST /score
    max_body_bytes: int = 8 * 1024 * 1024
    refresh_seconds: float = 1.0  # how often the live generation is checked
    # tokens one read may encode: distinct queries plus, for /score, distinct titles not in the catalogue, each at
    # most the encoder's max_length. All-MiniLM-L6-v2, torch on 1 thread, this 2-core machine beside another
    # benchmark: 5,000 tokens/s for 2,000-character texts (64 x 256 tokens in 3.3 s), 3,600/s for 256 short queries
    # (2,195 tokens in 0.6 s). 8,192 keeps one request to ~1.6 s of CPU here; 256 queries of 32 tokens pass.
    max_request_tokens: int = 8192
    # seconds from a read's arrival: one that waited longer for a thread answers 503 without working, one that runs
    # past it stops at the next step (matching.deadline) and answers 504
    request_seconds: float = 10.0
    # torch intra-op threads per process. 1: a single query's encode is too small to split, and split work
    # waits on the slowest thread whenever another process holds a core (see BENCHMARKS.md, service)
    torch_threads: int = 1
    # micro-batching of single-query reads (GET /search, a POST /search of one query): once one is queued, wait up to
    # this long for others with the same settings and search them as one batch (matching.service.batching); 0: each
    # request searches alone, as before. 2 ms, 100k titles, 16 clients on a 2-core machine: 270.0 req/s against
    # 106.8 alone, p99 149 ms against 316; 1 client: p50 13.1 ms against 11.4 (BENCHMARKS.md, issue #23)
    batch_wait_ms: float = 2.0
    batch_queries: int = 32  # at most this many queries in one micro-batch
    # threads searching micro-batches: two overlap one batch's encoding (torch, FAISS and numpy let go of the GIL) with
    # another's retrieval. 100k titles, 16 clients, 2 cores: 270.0 req/s, p99 149 ms against 225.6, 107 ms with one
    # (batches half as large; p99 the price)
    batch_threads: int = 2

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0 or (value == 0 and f.name != "batch_wait_ms"):
                bound = ">= 0" if f.name == "batch_wait_ms" else "> 0"
                raise ConfigError(f"ServiceConfig.{f.name} must be {bound}, got {value}")
