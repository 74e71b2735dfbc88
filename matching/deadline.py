"""A cooperative deadline for one piece of work: :func:`within` sets it, :func:`check` stops the work past it.

The deadline lives in a context variable, so it follows the work through the calls it makes in one thread (a
service's request, run in a worker thread) and is invisible to other threads. Long loops (the encoder's batches,
the search's per-query stages, pair scoring's groups) call :func:`check` between steps: past the deadline the
work stops with :class:`~matching.errors.DeadlineError` at the next step, and the thread is free again.
Nothing outside :func:`within` is ever stopped; catalogue changes never check, so a write is never cut mid-way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from matching.errors import ConfigError, DeadlineError

_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("matching_deadline", default=None)


@contextmanager
def within(seconds: float, *, start: float | None = None) -> Iterator[None]:
    """Work inside stops at the next :func:`check` once ``seconds`` have passed since ``start`` (a
    :func:`time.monotonic` reading; default now). Nested deadlines: the earlier one holds."""
    if not seconds > 0:
        raise ConfigError(f"a deadline needs seconds > 0, got {seconds!r}")
    until = (time.monotonic() if start is None else start) + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set((until, seconds) if outer is None or until < outer[0] else outer)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def remaining() -> float | None:
    """Seconds left before the deadline (negative past it); ``None`` outside :func:`within`."""
    current = _DEADLINE.get()
    return None if current is None else current[0] - time.monotonic()


def check() -> None:
    """Raise :class:`~matching.errors.DeadlineError` when the deadline set by :func:`within` has passed."""
    current = _DEADLINE.get()
    if current is not None and time.monotonic() > current[0]:
        raise DeadlineError(
            f"the work ran past its deadline of {current[1]:g} s and was stopped; "
            "send fewer or shorter texts, or allow more time"
        )
