"""``POST /score``: the reranker's score of given (query, title) pairs."""

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from matching.service.bodies import JsonRoute, ScoreBody
from matching.service.state import ReadDep

router = APIRouter(route_class=JsonRoute)


@router.post("/score")
def score(body: ScoreBody, request: Request, service: ReadDep) -> dict[str, Any]:
    """The reranker's score of each (query, title) pair; titles in the catalogue reuse their stored vectors."""
    if not body.pairs:
        raise HTTPException(400, "no pairs: give at least one")
    if len(body.pairs) > service.config.max_pairs:
        raise HTTPException(400, f"{len(body.pairs)} pairs in one request; at most {service.config.max_pairs}")
    longest = max(max(len(p.query), len(p.title)) for p in body.pairs)
    if longest > service.config.max_query_chars:
        raise HTTPException(400, f"a pair has a text of {longest} characters; at most {service.config.max_query_chars}")
    queries, titles = [p.query for p in body.pairs], [p.title for p in body.pairs]
    with service.deadline(request):
        matcher = service.pinned()
        service.budget(matcher, queries, titles)
        scores = matcher.score_pairs(queries, titles)
    return {"generation": matcher.generation, "scores": [float(s) for s in scores]}
