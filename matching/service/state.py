"""The state of one served bundle: the matcher, its refresh thread, the tokens, the request bounds (sizes, the token
budget, the deadline), and the dependencies through which the routers reach it."""

import asyncio
import concurrent.futures
import dataclasses
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from matching import deadline
from matching.bundle import live_name
from matching.config import ServiceConfig
from matching.errors import MatchingError
from matching.matcher import Matcher
from matching.service.batching import Batcher
from matching.service.metrics import Metrics
from matching.types import ChangeReport

log = logging.getLogger("matching.service")


class Service:
    """One bundle served: the matcher, its refresh thread, the tokens and the request bounds. ``token`` allows
    writes (off when ``None``); ``read_token``, when set, is needed (or the write token) for every read but
    ``/health`` and ``/ready``."""

    def __init__(
        self,
        bundle: str | Path,
        *,
        token: str | None = None,
        read_token: str | None = None,
        config: ServiceConfig | None = None,
    ) -> None:
        self.path = Path(bundle)
        self.token = token
        self.read_token = read_token
        self.config = config or ServiceConfig()
        self.metrics = Metrics()
        self.matcher: Matcher | None = None
        self.error: str | None = None
        self._lock = threading.Lock()  # one writer or refresher at a time in this process
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._torch_threads = 0
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="matching-writer")
        c = self.config
        self.batcher = Batcher(
            wait_s=c.batch_wait_ms / 1000, most=c.batch_queries, seconds=c.request_seconds, threads=c.batch_threads
        )

    def start(self) -> None:
        """Load the bundle and keep it fresh, in a background thread (``/ready`` says when it is loaded)."""
        self._thread = threading.Thread(target=self._run, name="matching-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.batcher.close()
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

    def authenticated(self, request: Request) -> bool:
        """Whether ``request`` carries the write token (never while writes are off)."""
        given = _bearer(request)
        return self.token is not None and given is not None and _same(given, self.token)

    def authorize(self, request: Request) -> None:
        if self.token is None:
            raise HTTPException(403, "writes are off: start the server with --token-file to allow them")
        given = _bearer(request)
        if given is None:
            raise HTTPException(401, "writes need 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
        if not _same(given, self.token):
            raise HTTPException(403, "wrong token")

    def authorize_read(self, request: Request) -> None:
        """Nothing while reads are open; with a read token, 401 without a bearer token, 403 for one that is neither
        the read nor the write token."""
        if self.read_token is None:
            return
        given = _bearer(request)
        if given is None:
            raise HTTPException(
                401, "reads need 'Authorization: Bearer <read token>' on this server", {"WWW-Authenticate": "Bearer"}
            )
        # both compared, always: the time taken says nothing of which one nearly matched
        read, write = _same(given, self.read_token), self.token is not None and _same(given, self.token)
        if not (read or write):
            raise HTTPException(403, "wrong token")

    @contextmanager
    def deadline(self, request: Request) -> Iterator[None]:
        """The read's deadline, ``request_seconds`` from its arrival (recorded by the app's middleware): 503 now if
        it waited that long for a thread; inside, the work stops at the next check past it (a 504)."""
        seconds = self.config.request_seconds
        arrived = getattr(request.state, "arrived", None) or time.monotonic()
        waited = time.monotonic() - arrived
        if waited > seconds:
            raise HTTPException(
                503,
                f"overloaded: the request waited {waited:.1f} s for a worker, past its {seconds:g} s deadline; retry",
                {"Retry-After": "1"},
            )
        with deadline.within(seconds, start=arrived):
            yield

    def budget(self, matcher: Matcher, queries: list[str], titles: list[str] | None = None) -> None:
        """413 when the request would encode more than ``max_request_tokens`` tokens (counting stops past it)."""
        limit = self.config.max_request_tokens
        if matcher.token_ceiling(queries, titles or []) <= limit:
            return  # too few texts to pass it at the token limit each: the tokenizer (on the event loop) is spared
        count = matcher.tokens_to_encode(queries, titles or [], stop_above=limit)
        if count > limit:
            what = "distinct queries and titles not in the catalogue" if titles else "distinct queries"
            raise HTTPException(
                413,
                f"the request would encode at least {count} tokens ({what}); at most {limit} a request "
                "(max_request_tokens): send fewer or shorter texts, over several requests",
            )

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


async def current_service(request: Request) -> Service:
    """The app's :class:`Service` (a FastAPI dependency; async, so it costs no thread hop)."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(current_service)]


async def read_service(request: Request) -> Service:
    """The app's :class:`Service`, once the request passed the read token (async: refused before any thread)."""
    service: Service = request.app.state.service
    service.authorize_read(request)
    return service


ReadDep = Annotated[Service, Depends(read_service)]


def _bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())
