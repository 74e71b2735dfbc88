"""``GET /search`` (one query) and ``POST /search`` (many, encoded in one pass); single queries are micro-batched
with concurrent ones of the same settings (:mod:`matching.service.batching`) unless ``batch_wait_ms`` is 0."""

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from matching.analysis import FOLD, Analyzer, matched_spans
from matching.filters import conditions, where_from_json
from matching.matcher import Matcher
from matching.service.bodies import JsonRoute, SearchBody
from matching.service.state import ReadDep, Service
from matching.types import Match, Retrieval

router = APIRouter(route_class=JsonRoute)


@router.get("/search")
async def search_one(
    request: Request,
    service: ReadDep,
    q: str,
    k: int = 10,
    where: str | None = Query(None, description='JSON object, e.g. {"brand": "acme", "price": {"<": 50}}'),
    retrieval: Retrieval | None = None,
    candidates: int = 100,
    rerank: bool = True,
    highlight: bool = False,
) -> dict[str, Any]:
    """The best titles for one query (searched in one batch with concurrent queries of the same settings)."""
    body = SearchBody(
        queries=[q],
        k=k,
        where=where_from_json(where),
        retrieval=retrieval,
        candidates=candidates,
        rerank=rerank,
        highlight=highlight,
    )
    if service.config.batch_wait_ms > 0:
        out = await batched(service, body, request)
    else:
        out = await run_in_threadpool(_direct, service, body, request)
    first = out.pop("results")[0]
    return {**out, **first}


@router.post("/search")
async def search_many(body: SearchBody, request: Request, service: ReadDep) -> dict[str, Any]:
    """The best titles for each of many queries, encoded in one pass (one query: batched with concurrent ones)."""
    if service.config.batch_wait_ms > 0 and len(body.queries) == 1:
        return await batched(service, body, request)
    return await run_in_threadpool(_direct, service, body, request)


def _direct(service: Service, body: SearchBody, request: Request) -> dict[str, Any]:
    with service.deadline(request):
        return search(service, body)


def search(service: Service, body: SearchBody) -> dict[str, Any]:
    """``body``'s queries searched in one generation, within the service's bounds and token budget."""
    _admit(service, body)
    start = time.perf_counter()
    matcher = service.pinned()
    service.budget(matcher, body.queries)
    results = matcher.search_batch(
        body.queries,
        body.k,
        candidates=max(body.k, body.candidates),
        rerank=body.rerank,
        where=body.where,
        retrieval=body.retrieval,
    )
    highlights = [body.highlight] * len(body.queries)
    return {
        "generation": matcher.generation,
        "took_ms": round((time.perf_counter() - start) * 1000, 3),
        "results": _entries(matcher, body.queries, highlights, results),
    }


async def batched(service: Service, body: SearchBody, request: Request) -> dict[str, Any]:
    """``body``'s one query searched in the service's next batch of its settings (:mod:`..batching`); the bounds
    and the token budget are checked before it is queued. ``took_ms`` counts the wait for the batch."""
    _admit(service, body)
    service.budget(service.ready(), body.queries)
    group = _Settings(
        service,
        body.k,
        max(body.k, body.candidates),
        body.rerank,
        json.dumps(body.where, sort_keys=True),  # 1 and 1.0, or 1 and true, stay apart: they filter differently
        body.retrieval,
        body.where,
    )
    arrived = getattr(request.state, "arrived", None) or time.monotonic()
    start = time.perf_counter()
    generation, entry = await asyncio.wrap_future(
        service.batcher.submit(group, (body.queries[0], body.highlight), arrived)
    )
    return {"generation": generation, "took_ms": round((time.perf_counter() - start) * 1000, 3), "results": [entry]}


@dataclass(frozen=True)
class _Settings:
    """What queries must share to be searched in one batch (:class:`matching.service.batching.Group`)."""

    service: Service
    k: int
    candidates: int
    rerank: bool
    where_key: str
    retrieval: Retrieval | None
    where: Any = field(compare=False, hash=False)

    def run(self, items: list[tuple[str, bool]]) -> list[tuple[str | None, dict[str, Any]]]:
        """Each ``(query, highlight)`` searched, in one :meth:`~matching.Matcher.search_batch` on one generation."""
        matcher = self.service.pinned()
        queries = [q for q, _ in items]
        results = matcher.search_batch(
            queries, self.k, candidates=self.candidates, rerank=self.rerank, where=self.where, retrieval=self.retrieval
        )
        entries = _entries(matcher, queries, [h for _, h in items], results)
        return [(matcher.generation, entry) for entry in entries]


def _admit(service: Service, body: SearchBody) -> None:
    service.check(body.queries, body.k, body.candidates)
    if body.where is not None:
        conditions(body.where)  # a malformed where is a 400 before any query is encoded


def _entries(
    matcher: Matcher, queries: list[str], highlights: list[bool], results: list[list[Match]]
) -> list[dict[str, Any]]:
    lexical = matcher.manifest.lexical or {}
    analyzer = Analyzer(lexical.get("analyzer", Analyzer.ENGLISH))
    fold = int(lexical.get("fold", 1)) if lexical else FOLD  # as the bundle's index folds, which may predate FOLD
    return [
        {"query": q, "hits": [_hit(m, q if h else None, analyzer, fold) for m in hits]}
        for q, h, hits in zip(queries, highlights, results, strict=True)
    ]


def _hit(match: Match, query: str | None, analyzer: Analyzer, fold: int) -> dict[str, Any]:
    out = dataclasses.asdict(match)
    if query is not None:
        out["highlights"] = matched_spans(query, match.title, analyzer, fold)
    return out
