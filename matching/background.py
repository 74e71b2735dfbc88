"""A worker thread fed through a bounded queue: how a build runs work beside the encoder (the BM25 index,
:mod:`matching.lexical.streamed`; the vector file's checksums, :class:`matching.checksums.BlockHasher`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar, cast

T = TypeVar("T")
_END = object()  # queued by join(): the worker ends after what came before


class Background(Generic[T]):
    """Calls ``take(item)`` on a worker thread for each item :meth:`put`, in order, with at most ``depth`` items
    waiting. The first error ``take`` raises is kept in :attr:`error` (:meth:`check` raises it); the items after it
    are dropped, so a :meth:`put` waiting on a full queue goes through."""

    def __init__(self, take: Callable[[T], None], *, depth: int, name: str, what: str) -> None:
        self.what = what  # for the error of a put after join: "this <what> is finished"
        self.error: BaseException | None = None
        self._take = take
        self._queue: queue.Queue[object] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        """Hand ``item`` to the worker; waits while ``depth`` items are waiting."""
        if not self._thread.is_alive():
            raise RuntimeError(f"this {self.what} is finished")
        self._queue.put(item)

    def join(self) -> None:
        """Let the worker take what was put, then end it (again: nothing)."""
        if self._thread.is_alive():
            self._queue.put(_END)
            self._thread.join()

    def check(self) -> None:
        """Raise the error the worker kept, if any."""
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self._queue.get()) is not _END:
            if self.error is not None:
                continue
            try:
                self._take(cast(T, item))
            except BaseException as exc:  # kept for the caller's thread
                self.error = exc
