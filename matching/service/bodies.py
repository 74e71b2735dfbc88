"""The JSON bodies the service accepts (unknown fields are refused)."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from matching.types import Retrieval


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[str]
    k: int = 10
    # any JSON: the filter grammar checks it (matching.filters), so GET and POST answer one message per problem
    where: Any = Field(None, json_schema_extra={"type": "object"})
    retrieval: Retrieval | None = None
    candidates: int = 100
    rerank: bool = True
    highlight: bool = False


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str
    title: str


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[Pair]


class RowsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[dict[str, Any]]


class RemoveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str | int]
    missing_ok: bool = False
