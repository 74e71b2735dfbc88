"""The JSON bodies the service accepts (unknown fields are refused), and the route class that parses them."""

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute
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


class _Request(Request):
    """A request whose JSON body pydantic-core parses: in the event loop, which every request waits on, a 7.7 MB
    /score body took 2 ms so, 10-18 ms with ``json.loads``. A body it refuses goes to ``json.loads`` as before,
    so FastAPI and the app's handler name the same errors (and lone surrogates, which it refuses, still parse)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError:
                self._json = json.loads(body)
        return self._json


class JsonRoute(APIRoute):
    """The routers' route class: JSON bodies parsed as :class:`_Request` parses them."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_Request(request.scope, request.receive))

        return route
