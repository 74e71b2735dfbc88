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
_SETUP_LOCK = threading.Lock()  # one worker at a time moves torch's process default (and puts it back)


def _forget_workers() -> None:
    # a forked child inherits the pool but none of its threads: work handed to it would wait for ever
    global _ASIDE, _ASIDE_LOCK, _SETUP_LOCK
    _ASIDE, _ASIDE_LOCK, _SETUP_LOCK = None, threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_forget_workers)


def start_encoding(
    snap: Snapshot, queries: Sequence[str], retrieval: Retrieval | str, *, show_progress: bool = False
) -> np.ndarray | Future[np.ndarray]:
    """The queries' vectors for a search by ``retrieval``: encoded aside (:func:`encode_aside`) where the search
    reads BM25 first and torch would spread the encoding over this thread's cores, else (or where the workers
    cannot take work: the interpreter shutting down) encoded now."""
    words = parse_retrieval(retrieval) is not Retrieval.DENSE and snap.lexical is not None
    if ENCODE_ASIDE and words and torch.get_num_threads() > 1:
        try:
            return encode_aside(snap, queries, show_progress=show_progress)
        except RuntimeError:  # shut down, or a broken pool (BrokenExecutor): a new one next time
            _drop_workers()
    return snap.encode_queries(queries, show_progress=show_progress)


def _drop_workers() -> None:
    global _ASIDE
    with _ASIDE_LOCK:
        _ASIDE = None


def _workers_threads(default: int) -> None:
    """Run this worker's torch on one thread fewer than the process's ``default`` (the caller's BM25 runs on the
    one left), leaving the default for threads started later as it was."""
    with _SETUP_LOCK:
        torch.get_num_threads()  # this thread takes the process default here, once
        torch.set_num_threads(max(1, default - 1))  # its own count; as a side effect, also the process default
        # the default back, from a bystander (a thread that first uses torch inside this window takes the
        # worker's count: a window of about 0.1 ms, once per worker)
        restore = threading.Thread(target=torch.set_num_threads, args=(default,))
        restore.start()
        restore.join()


def encode_aside(snap: Snapshot, queries: Sequence[str], *, show_progress: bool = False) -> Future[np.ndarray]:
    """Start :meth:`Snapshot.encode_queries` on a worker thread, in the caller's context (its deadline), so the
    caller can search the words meanwhile. The workers run torch on one thread fewer than the caller's (a
    per-thread setting: the caller's, and the default of threads started later, stay as they were; with the
    default count, searches encoded first slowed by a third in the same process, the workers' own thread teams in
    the way).

    1M generated titles, 2 cores (so one torch thread aside; scripts/bench_hybrid.py, four runs): one query at a
    time, back to back, hybrid search median 8.5 / 9.5 / 9.1 / 10.2 ms against 9.7 / 11.2 / 10.1 / 11.7 ms
    encoding first; a search_batch of 300 queries 0.95x to 1.47x (no clear gain); with a 10 ms pause after each
    search, slower: 12.3 ms against 10.8 ms (both threads start cold).
    """
    global _ASIDE
    with _ASIDE_LOCK:
        if _ASIDE is None:
            _ASIDE = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1,
                thread_name_prefix="matching-encode",
                initializer=_workers_threads,
                initargs=(torch.get_num_threads(),),
            )
        pool = _ASIDE
    context = contextvars.copy_context()
    return pool.submit(context.run, snap.encode_queries, queries, show_progress=show_progress)
