"""Progress bars that exist only when they are shown.

Every tqdm bar, a disabled one too, starts tqdm's monitor thread, which takes tqdm's class lock every 10 s; a
process forked while that thread holds the lock leaves its child waiting on it for ever at the child's first bar
(seen: the crash-safety test's forked writers stuck 120 s in tqdm's lock in a build). Code that shows no progress
makes no bar here, so a process that never shows one (a server, a library caller with ``show_progress=False``)
never starts that thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class Bar(Protocol):
    """What callers use of a bar."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...

    def __enter__(self) -> Bar: ...

    def __exit__(self, *exc: object) -> Any: ...


class _Hidden:
    """A bar that shows nothing and starts nothing."""

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, **values: Any) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> _Hidden:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def bar(show: bool, **settings: Any) -> Bar:
    """A tqdm bar made with ``settings`` where ``show``, else one that does nothing."""
    shown: Bar = tqdm(**settings) if show else _Hidden()
    return shown


def each(items: Iterable[T], show: bool, **settings: Any) -> Iterable[T]:
    """``items`` behind a tqdm bar where ``show``, else ``items`` themselves."""
    shown: Iterable[T] = tqdm(items, **settings) if show else items
    return shown
