"""``POST /add``, ``/upsert`` and ``/remove``: catalogue changes, each needing the bearer token."""

from typing import Any

import pandas as pd
from fastapi import APIRouter, HTTPException, Request

from matching.ingest import has_surrogate
from matching.service.bodies import JsonRoute, RemoveBody, RowsBody
from matching.service.state import Service, ServiceDep

router = APIRouter(route_class=JsonRoute)


def _rows_frame(service: Service, body: RowsBody) -> pd.DataFrame:
    if not body.rows:
        raise HTTPException(400, "no rows: give at least one")
    if len(body.rows) > service.config.max_batch:
        raise HTTPException(400, f"{len(body.rows)} rows in one request; at most {service.config.max_batch}")
    for i, row in enumerate(body.rows):
        bad = next((key for key in row if has_surrogate(key)), None)
        if bad is not None:  # pandas cannot even name such a column
            raise HTTPException(
                400, f"row {i}: field name {bad!r} holds a lone surrogate (half of a UTF-16 pair); fix the name"
            )
    return pd.DataFrame(body.rows, dtype=object)  # ints stay ints beside rows that lack the field


@router.post("/add")
async def add(body: RowsBody, request: Request, service: ServiceDep) -> dict[str, Any]:
    """Add titles (``rows``: objects with the bundle's id and title fields plus metadata). Needs the token."""
    service.authorize(request)
    frame = _rows_frame(service, body)
    return await service.write(lambda m: m.add(frame, show_progress=False))


@router.post("/upsert")
async def upsert(body: RowsBody, request: Request, service: ServiceDep) -> dict[str, Any]:
    """Add titles and replace those with the same id. Needs the token."""
    service.authorize(request)
    frame = _rows_frame(service, body)
    return await service.write(lambda m: m.upsert(frame, show_progress=False))


@router.post("/remove")
async def remove(body: RemoveBody, request: Request, service: ServiceDep) -> dict[str, Any]:
    """Remove titles by id. Needs the token."""
    service.authorize(request)
    if len(body.ids) > service.config.max_batch:
        raise HTTPException(400, f"{len(body.ids)} ids in one request; at most {service.config.max_batch}")
    return await service.write(lambda m: m.remove(body.ids, missing_ok=body.missing_ok))
