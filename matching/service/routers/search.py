"""``GET /search`` (one query) and ``POST /search`` (many, encoded in one pass)."""

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Query, Request

from matching.analysis import FOLD, Analyzer, matched_spans
from matching.filters import conditions, where_from_json
from matching.service.bodies import JsonRoute, SearchBody
from matching.service.state import ReadDep, Service
from matching.types import Match, Retrieval

router = APIRouter(route_class=JsonRoute)


@router.get("/search")
def search_one(
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
    """The best titles for one query."""
    body = SearchBody(
        queries=[q],
        k=k,
        where=where_from_json(where),
        retrieval=retrieval,
        candidates=candidates,
        rerank=rerank,
        highlight=highlight,
    )
    with service.deadline(request):
        out = search(service, body)
    first = out.pop("results")[0]
    return {**out, **first}


@router.post("/search")
def search_many(body: SearchBody, request: Request, service: ReadDep) -> dict[str, Any]:
    """The best titles for each of many queries, encoded in one pass."""
    with service.deadline(request):
        return search(service, body)


def search(service: Service, body: SearchBody) -> dict[str, Any]:
    """``body``'s queries searched in one generation, within the service's bounds and token budget."""
    service.check(body.queries, body.k, body.candidates)
    if body.where is not None:
        conditions(body.where)  # a malformed where is a 400 before any query is encoded
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
    lexical = matcher.manifest.lexical or {}
    analyzer = Analyzer(lexical.get("analyzer", Analyzer.ENGLISH))
    fold = int(lexical.get("fold", 1)) if lexical else FOLD  # as the bundle's index folds, which may predate FOLD
    return {
        "generation": matcher.generation,
        "took_ms": round((time.perf_counter() - start) * 1000, 3),
        "results": [
            {"query": q, "hits": [_hit(m, q if body.highlight else None, analyzer, fold) for m in hits]}
            for q, hits in zip(body.queries, results, strict=True)
        ],
    }


def _hit(match: Match, query: str | None, analyzer: Analyzer, fold: int) -> dict[str, Any]:
    out = dataclasses.asdict(match)
    if query is not None:
        out["highlights"] = matched_spans(query, match.title, analyzer, fold)
    return out
