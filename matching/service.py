"""The search service (``matching serve``): FastAPI over one bundle, thin over :class:`~matching.Matcher`.

Every request searches one generation (:meth:`Matcher.pin`); a background thread moves the service to a
generation another process published; writes need the bearer token. Needs the extra ``matching[serve]``.
"""

import asyncio
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict

from matching.analysis import Analyzer, matched_spans
from matching.bundle import live_name
from matching.config import ServiceConfig
from matching.errors import BundleLockedError, ConfigError, MatchingError
from matching.matcher import Matcher
from matching.types import ChangeReport, Match, Retrieval

log = logging.getLogger(__name__)

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[str]
    k: int = 10
    where: dict[str, Any] | None = None
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


class Metrics:
    """Request counts, errors and a latency histogram per route, rendered as Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[route, status] = self.requests.get((route, status), 0) + 1
            counts = self.buckets.setdefault(route, [0] * (len(_BUCKETS) + 1))
            counts[next((i for i, b in enumerate(_BUCKETS) if seconds <= b), len(_BUCKETS))] += 1
            self.sums[route] = self.sums.get(route, 0.0) + seconds

    def render(self, matcher: Matcher | None) -> str:
        out = [
            "# HELP matching_requests_total Requests by route and HTTP status.",
            "# TYPE matching_requests_total counter",
        ]
        with self._lock:
            for (route, status), n in sorted(self.requests.items()):
                out.append(f'matching_requests_total{{route="{route}",status="{status}"}} {n}')
            errors: dict[str, int] = {}
            for (route, status), n in self.requests.items():
                if status >= 400:
                    errors[route] = errors.get(route, 0) + n
            out += [
                "# HELP matching_errors_total Requests answered 4xx or 5xx.",
                "# TYPE matching_errors_total counter",
            ]
            out += [f'matching_errors_total{{route="{r}"}} {n}' for r, n in sorted(errors.items())]
            out += [
                "# HELP matching_request_seconds Request latency.",
                "# TYPE matching_request_seconds histogram",
            ]
            for route, counts in sorted(self.buckets.items()):
                total = 0
                for bound, n in zip((*_BUCKETS, float("inf")), counts, strict=True):
                    total += n
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    out.append(f'matching_request_seconds_bucket{{route="{route}",le="{le}"}} {total}')
                out.append(f'matching_request_seconds_sum{{route="{route}"}} {self.sums[route]:.6f}')
                out.append(f'matching_request_seconds_count{{route="{route}"}} {total}')
        if matcher is not None:
            generation = matcher.generation or ""
            out += [
                "# HELP matching_generation The bundle generation served (its number).",
                "# TYPE matching_generation gauge",
                f"matching_generation {int(generation.rpartition('-')[2] or 0)}",
                "# HELP matching_titles Live titles in the served generation.",
                "# TYPE matching_titles gauge",
                f"matching_titles {len(matcher)}",
            ]
        return "\n".join(out) + "\n"


class Service:
    """One bundle served: the matcher, its refresh thread, the write token and the request bounds."""

    def __init__(self, bundle: str | Path, *, token: str | None = None, config: ServiceConfig | None = None) -> None:
        self.path = Path(bundle)
        self.token = token
        self.config = config or ServiceConfig()
        self.metrics = Metrics()
        self.matcher: Matcher | None = None
        self.error: str | None = None
        self._lock = threading.Lock()  # one writer or refresher at a time in this process
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._torch_threads = 0
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="matching-writer")

    def start(self) -> None:
        """Load the bundle and keep it fresh, in a background thread (``/ready`` says when it is loaded)."""
        self._thread = threading.Thread(target=self._run, name="matching-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._writer.shutdown(wait=True)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.matcher is not None:
            self.matcher.close()
        if self._torch_threads:  # the setting is process-wide: give it back (an app in tests, in a notebook)
            import torch

            torch.set_num_threads(self._torch_threads)

    def _run(self) -> None:
        import torch

        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(self.config.torch_threads)
        while self.matcher is None:
            try:
                matcher = Matcher.load(self.path)
                # the first encode builds the encoder's runner (0.4 s here): before /ready, not in a user's request
                matcher.query_encoder.encode_queries(["warm up"])
                self.matcher, self.error = matcher, None
            except Exception as exc:  # keep trying: /ready says why meanwhile
                self.error = f"cannot load the bundle: {exc}"
                log.error("cannot serve %s: %s", self.path, exc)
                if self._stop.wait(max(5.0, self.config.refresh_seconds)):
                    return
        while not self._stop.wait(self.config.refresh_seconds):
            try:
                self.refresh()
            except Exception as exc:  # the thread must outlive any one failure, or the service goes stale
                self.error = f"cannot refresh: {exc}"
                log.exception("refreshing %s failed", self.path)

    def refresh(self) -> bool:
        """Move to the bundle's live generation if another process published one; searches in flight finish on
        the one they started with."""
        matcher = self.matcher
        if matcher is None or live_name(self.path) == matcher.generation:
            return False
        with self._lock:
            try:
                refreshed = matcher.refresh()
            except MatchingError as exc:  # a damaged new generation: keep serving the one we have
                self.error = f"cannot refresh: {exc}"
                log.error("cannot refresh %s: %s", self.path, exc)
                return False
            self.error = None
            return refreshed

    def ready(self) -> Matcher:
        if self.matcher is None:
            raise HTTPException(503, self.error or "loading the bundle")
        return self.matcher

    def pinned(self) -> Matcher:
        return self.ready().pin()

    async def write(self, change: Callable[[Matcher], ChangeReport]) -> dict[str, Any]:
        """Run a change on the service's one writer thread, so waiting writes never hold the threads that
        answer searches."""
        matcher = self.ready()

        def run() -> ChangeReport:
            with self._lock:
                return change(matcher)

        report = await asyncio.get_running_loop().run_in_executor(self._writer, run)
        return dataclasses.asdict(report)

    def authorize(self, request: Request) -> None:
        if self.token is None:
            raise HTTPException(403, "writes are off: start the server with --token-file to allow them")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "writes need 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise HTTPException(403, "wrong token")

    # -- bounds --------------------------------------------------------------------------------------

    def check(self, queries: list[str], k: int, candidates: int) -> None:
        c = self.config
        if not queries:
            raise HTTPException(400, "no queries: give at least one")
        if len(queries) > c.max_batch:
            raise HTTPException(400, f"{len(queries)} queries in one request; at most {c.max_batch}")
        long = next((i for i, q in enumerate(queries) if len(q) > c.max_query_chars), None)
        if long is not None:
            raise HTTPException(400, f"query {long} has {len(queries[long])} characters; at most {c.max_query_chars}")
        if not 1 <= k <= c.max_k:
            raise HTTPException(400, f"k must be between 1 and {c.max_k}, got {k}")
        if not 1 <= candidates <= c.max_candidates:
            raise HTTPException(400, f"candidates must be between 1 and {c.max_candidates}, got {candidates}")

    def search(self, body: SearchBody) -> dict[str, Any]:
        self.check(body.queries, body.k, body.candidates)
        start = time.perf_counter()
        matcher = self.pinned()
        results = matcher.search_batch(
            body.queries, body.k, candidates=max(body.k, body.candidates), rerank=body.rerank, where=body.where,
            retrieval=body.retrieval,
        )  # fmt: skip
        analyzer = Analyzer((matcher.manifest.lexical or {}).get("analyzer", Analyzer.ENGLISH))
        return {
            "generation": matcher.generation,
            "took_ms": round((time.perf_counter() - start) * 1000, 3),
            "results": [
                {"query": q, "hits": [_hit(m, q if body.highlight else None, analyzer) for m in hits]}
                for q, hits in zip(body.queries, results, strict=True)
            ],
        }


def _hit(match: Match, query: str | None, analyzer: Analyzer) -> dict[str, Any]:
    out = dataclasses.asdict(match)
    if query is not None:
        out["highlights"] = matched_spans(query, match.title, analyzer)
    return out


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


def _parse_where(text: str | None) -> dict[str, Any] | None:
    if text is None or not text.strip():
        return None
    try:
        where = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HTTPException(400, f'where is not JSON ({exc.msg}); e.g. where={{"price": {{"<": 50}}}}') from None
    if not isinstance(where, dict):
        raise HTTPException(400, 'where must be a JSON object, e.g. {"brand": "acme", "price": {">=": 10}}')
    return where


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

    @app.exception_handler(MatchingError)
    async def matching_error(_: Request, exc: MatchingError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409 if isinstance(exc, BundleLockedError) else 400)

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            route = getattr(request.scope.get("route"), "path", "other")
            service.metrics.observe(route, 500, time.perf_counter() - start)
            raise
        route = getattr(request.scope.get("route"), "path", "other")
        service.metrics.observe(route, response.status_code, time.perf_counter() - start)
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("matching").joinpath("search_page.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict[str, str]:
        """Alive (the bundle may still be loading: see /ready)."""
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, Any]:
        """200 once the bundle is loaded, with its generation and title count; 503 before."""
        matcher = service.pinned()
        return {"status": "ready", "generation": matcher.generation, "count": len(matcher)}

    @app.get("/info")
    def info() -> dict[str, Any]:
        """The bundle's manifest, its metadata fields and this service's bounds."""
        matcher = service.pinned()
        return {
            **matcher.info(),
            "path": str(service.path),
            "generation": matcher.generation,
            "count": len(matcher),
            "metadata_keys": matcher.store.metadata_keys(),
            "limits": service.config.to_dict(),
            "writes": service.token is not None,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        """Prometheus text: requests, errors, latency histogram, generation."""
        return service.metrics.render(service.matcher)

    @app.get("/search")
    def search_one(
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
            queries=[q], k=k, where=_parse_where(where), retrieval=retrieval, candidates=candidates, rerank=rerank,
            highlight=highlight,
        )  # fmt: skip
        out = service.search(body)
        first = out.pop("results")[0]
        return {**out, **first}

    @app.post("/search")
    def search_many(body: SearchBody) -> dict[str, Any]:
        """The best titles for each of many queries, encoded in one pass."""
        return service.search(body)

    @app.post("/score")
    def score(body: ScoreBody) -> dict[str, Any]:
        """The reranker's score of each (query, title) pair; titles in the catalogue reuse their stored vectors."""
        if not body.pairs:
            raise HTTPException(400, "no pairs: give at least one")
        if len(body.pairs) > service.config.max_pairs:
            raise HTTPException(400, f"{len(body.pairs)} pairs in one request; at most {service.config.max_pairs}")
        longest = max(max(len(p.query), len(p.title)) for p in body.pairs)
        if longest > service.config.max_query_chars:
            raise HTTPException(
                400, f"a pair has a text of {longest} characters; at most {service.config.max_query_chars}"
            )
        matcher = service.pinned()
        scores = matcher.score_pairs([p.query for p in body.pairs], [p.title for p in body.pairs])
        return {"generation": matcher.generation, "scores": [float(s) for s in scores]}

    def rows_frame(body: RowsBody) -> pd.DataFrame:
        if not body.rows:
            raise HTTPException(400, "no rows: give at least one")
        if len(body.rows) > service.config.max_batch:
            raise HTTPException(400, f"{len(body.rows)} rows in one request; at most {service.config.max_batch}")
        return pd.DataFrame(body.rows, dtype=object)  # ints stay ints beside rows that lack the field

    @app.post("/add")
    async def add(body: RowsBody, request: Request) -> dict[str, Any]:
        """Add titles (``rows``: objects with the bundle's id and title fields plus metadata). Needs the token."""
        service.authorize(request)
        frame = rows_frame(body)
        return await service.write(lambda m: m.add(frame, show_progress=False))

    @app.post("/upsert")
    async def upsert(body: RowsBody, request: Request) -> dict[str, Any]:
        """Add titles and replace those with the same id. Needs the token."""
        service.authorize(request)
        frame = rows_frame(body)
        return await service.write(lambda m: m.upsert(frame, show_progress=False))

    @app.post("/remove")
    async def remove(body: RemoveBody, request: Request) -> dict[str, Any]:
        """Remove titles by id. Needs the token."""
        service.authorize(request)
        if len(body.ids) > service.config.max_batch:
            raise HTTPException(400, f"{len(body.ids)} ids in one request; at most {service.config.max_batch}")
        return await service.write(lambda m: m.remove(body.ids, missing_ok=body.missing_ok))

    app.add_middleware(_BodyLimit, limit=service.config.max_body_bytes)
    return app


class _BodyLimit:
    """:func:`limit_body` in the shape ``add_middleware`` takes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app = limit_body(app, limit)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def read_token(path: str | Path) -> str:
    """The write token in ``path`` (its first line), refused when empty or unreadable."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the token file {str(path)!r}: {exc}") from None
    if not token:
        raise ConfigError(f"the token file {str(path)!r} is empty; put a long random string in it")
    return token


# environment of `matching serve --workers N`: each uvicorn worker process builds its app from it
ENV_BUNDLE, ENV_TOKEN, ENV_CONFIG = "MATCHING_SERVE_BUNDLE", "MATCHING_SERVE_TOKEN_FILE", "MATCHING_SERVE_CONFIG"


def app_from_env() -> FastAPI:
    """The app for one worker of ``matching serve --workers N`` (uvicorn's factory)."""
    token_file = os.environ.get(ENV_TOKEN)
    config = ServiceConfig.from_dict(json.loads(os.environ.get(ENV_CONFIG) or "{}"))
    return create_app(os.environ[ENV_BUNDLE], token=read_token(token_file) if token_file else None, config=config)


def serve(
    bundle: str | Path, *, host: str, port: int, workers: int = 1, token_file: str | Path | None = None,
    config: ServiceConfig | None = None, log_level: str = "info",
) -> None:  # fmt: skip
    """Run the service under uvicorn until interrupted (``matching serve``); ``workers`` > 1 starts that many
    processes, each building its app from the environment (:func:`app_from_env`)."""
    import uvicorn

    from matching.bundle import current_generation

    current_generation(Path(bundle))  # a missing or broken bundle fails here, not in every worker
    config = config or ServiceConfig()
    token = read_token(token_file) if token_file else None
    if workers == 1:
        uvicorn.run(create_app(bundle, token=token, config=config), host=host, port=port, log_level=log_level)
        return
    os.environ[ENV_BUNDLE] = str(Path(bundle).resolve())
    os.environ[ENV_CONFIG] = json.dumps(config.to_dict())
    if token_file:
        os.environ[ENV_TOKEN] = str(Path(token_file).resolve())
    uvicorn.run(
        "matching.service:app_from_env", factory=True, host=host, port=port, workers=workers, log_level=log_level
    )
