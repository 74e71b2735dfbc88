"""The FastAPI app for one bundle: its state, error handling, middleware, and the routers wired in."""

import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from matching.config import ServiceConfig
from matching.errors import BundleLockedError, DeadlineError, MatchingError
from matching.service.routers import ops, score, search, writes
from matching.service.state import Service

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def create_app(
    bundle: str | Path,
    *,
    token: str | None = None,
    read_token: str | None = None,
    config: ServiceConfig | None = None,
) -> FastAPI:
    """The FastAPI app serving ``bundle``; writes need ``token`` (off when ``None``); reads other than ``/health``
    and ``/ready`` need ``read_token`` or ``token`` when ``read_token`` is set (open when ``None``)."""
    service = Service(bundle, token=token, read_token=read_token, config=config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.stop()

    # no slash redirects: Starlette builds their Location from the request's Host header, which a client forges
    app = FastAPI(
        title="matching",
        summary="Two-tower semantic matching over one bundle",
        lifespan=lifespan,
        redirect_slashes=False,
    )
    app.state.service = service
    app.exception_handler(MatchingError)(_matching_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    for module in (ops, search, score, writes):
        app.include_router(module.router)
    app.add_middleware(_Measure)
    app.add_middleware(_BodyLimit, limit=service.config.max_body_bytes)
    return app


async def _matching_error(_: Request, exc: MatchingError) -> JSONResponse:
    """400 for the library's refusals of the request; 409 while another writer holds the bundle; 504 for a read
    stopped at its deadline."""
    status = 409 if isinstance(exc, BundleLockedError) else 504 if isinstance(exc, DeadlineError) else 400
    return JSONResponse({"detail": str(exc)}, status_code=status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's answer, with a body the JSON parser gave up on named (FastAPI says only that parsing failed)."""
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, RecursionError | ValueError):
        why = (
            "nests deeper than the JSON parser goes" if isinstance(cause, RecursionError) else f"is unreadable: {cause}"
        )
        return JSONResponse({"detail": f"the request body {why}; no request needs more than 4 levels"}, 400)
    return await http_exception_handler(request, exc)


class _Measure:
    """ASGI middleware: count each request and its latency under its route's path (``other`` when no route matched);
    record when it arrived, from which its deadline runs (:meth:`Service.deadline`). Plain ASGI, not Starlette's
    ``BaseHTTPMiddleware``, whose task group and streamed response took ~15% of the event loop's samples at 16
    clients (py-spy; the tokenizer took 5%)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        metrics = scope["app"].state.service.metrics
        scope.setdefault("state", {})["arrived"] = time.monotonic()
        start = time.perf_counter()
        status = 500

        async def sent(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            metrics.observe(route, status, time.perf_counter() - start)
        return None


def limit_body(app: ASGIApp, limit: int) -> ASGIApp:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, declared or streamed (chunked).

    The body is read here, before the app sees it: an error raised while the app reads it would cross
    FastAPI's body parsing and the task groups of its middleware, and come out as a 400."""

    async def middleware(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        too_large = JSONResponse({"detail": _too_large(limit)}, status_code=413)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await too_large(scope, receive, send)
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return None
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Any:
            return replay.pop() if replay else await receive()  # then a disconnect, as the server says

        await app(scope, replayed, send)

    return middleware


def _too_large(limit: int) -> str:
    return f"request body over {limit} bytes; send fewer queries, pairs or rows"


class _BodyLimit:
    """:func:`limit_body` in the shape ``add_middleware`` takes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app = limit_body(app, limit)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)
