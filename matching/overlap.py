"""Work a search does at once: the queries encoded on a worker thread while the caller searches their words."""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from matching.search import Snapshot, parse_retrieval
from matching.types import Retrieval

# False: queries are encoded first and searched after (the reference encode_aside is benchmarked against)
ENCODE_ASIDE = True
_ASIDE: ThreadPoolExecutor | None = None
_ASIDE_LOCK = threading.Lock()


def _forget_workers() -> None:
    # a forked child inherits the pool but none of its threads: work handed to it would wait for ever
    global _ASIDE, _ASIDE_LOCK
    _ASIDE, _ASIDE_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_workers)


def start_encoding(
    snap: Snapshot, queries: Sequence[str], retrieval: Retrieval | str, *, show_progress: bool = False
) -> np.ndarray | Future[np.ndarray]:
    """The queries' vectors for a search by ``retrieval``: encoded aside (:func:`encode_aside`) where the search
    reads BM25 first and torch would spread the encoding over this thread's cores, else encoded now."""
    words = parse_retrieval(retrieval) is not Retrieval.DENSE and snap.lexical is not None
    if ENCODE_ASIDE and words and torch.get_num_threads() > 1:
        return encode_aside(snap, queries, show_progress=show_progress)
    return snap.encode_queries(queries, show_progress=show_progress)


def _one_torch_thread() -> None:
    """Run this thread's torch on one thread, leaving the process's default for new threads as it was."""
    default = torch.get_num_threads()  # this thread takes the default here, once
    torch.set_num_threads(1)  # this thread's own count, and (a side effect) the default for threads started later
    restore = threading.Thread(target=torch.set_num_threads, args=(default,))  # the default back, from a bystander
    restore.start()
    restore.join()


def encode_aside(snap: Snapshot, queries: Sequence[str], *, show_progress: bool = False) -> Future[np.ndarray]:
    """Start :meth:`Snapshot.encode_queries` on a worker thread, in the caller's context (its deadline), so the
    caller can search the words meanwhile. The workers run torch on one thread each (a per-thread setting: the
    caller's, and the default of threads started later, stay as they were; with the default count, searches
    encoded first slowed by a third in the same process, the workers' own thread teams in the way).

    1M generated titles, 2 cores (scripts/bench_hybrid.py, two runs): one query at a time, back to back, hybrid
    search median 8.5 / 9.5 ms against 9.7 / 11.2 ms encoding first; a search_batch of 300 queries 1.47x faster;
    but with a 10 ms pause after each search 12.3 ms against 10.8 ms (both threads start cold).
    """
    global _ASIDE
    with _ASIDE_LOCK:
        if _ASIDE is None:
            _ASIDE = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1,
                thread_name_prefix="matching-encode",
                initializer=_one_torch_thread,
            )
    context = contextvars.copy_context()
    return _ASIDE.submit(context.run, snap.encode_queries, queries, show_progress=show_progress)
