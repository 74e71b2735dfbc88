"""The FastAPI app for one bundle: its state, error handling, middleware, and the routers wired in."""

import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from matching.config import ServiceConfig
from matching.errors import BundleLockedError, MatchingError
from matching.service.routers import ops, score, search, writes
from matching.service.state import Service

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def create_app(bundle: str | Path, *, token: str | None = None, config: ServiceConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``bundle``; writes need ``token`` (off when ``None``)."""
    service = Service(bundle, token=token, config=config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.stop()

    app = FastAPI(title="matching", summary="Two-tower semantic matching over one bundle", lifespan=lifespan)
    app.state.service = service
    app.exception_handler(MatchingError)(_matching_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.middleware("http")(_measure)
    for module in (ops, search, score, writes):
        app.include_router(module.router)
    app.add_middleware(_BodyLimit, limit=service.config.max_body_bytes)
    return app


async def _matching_error(_: Request, exc: MatchingError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=409 if isinstance(exc, BundleLockedError) else 400)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's answer, with a body the JSON parser gave up on named (FastAPI says only that parsing failed)."""
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, RecursionError | ValueError):
        why = (
            "nests deeper than the JSON parser goes" if isinstance(cause, RecursionError) else f"is unreadable: {cause}"
        )
        return JSONResponse({"detail": f"the request body {why}; no request needs more than 4 levels"}, 400)
    return await http_exception_handler(request, exc)


async def _measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Count each request and its latency under its route's path (``other`` when no route matched)."""
    metrics = request.app.state.service.metrics
    start = time.perf_counter()
    try:
        response = await call_next(request)
    except Exception:
        route = getattr(request.scope.get("route"), "path", "other")
        metrics.observe(route, 500, time.perf_counter() - start)
        raise
    route = getattr(request.scope.get("route"), "path", "other")
    metrics.observe(route, response.status_code, time.perf_counter() - start)
    return response


def limit_body(app: ASGIApp, limit: int) -> ASGIApp:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, declared or streamed."""

    async def middleware(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            response = JSONResponse({"detail": _too_large(limit)}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI passes an HTTPException raised while reading the body through
                    raise HTTPException(413, _too_large(limit))
            return message

        await app(scope, limited, send)

    return middleware


def _too_large(limit: int) -> str:
    return f"request body over {limit} bytes; send fewer queries, pairs or rows"


class _BodyLimit:
    """:func:`limit_body` in the shape ``add_middleware`` takes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app = limit_body(app, limit)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)
