"""The host side of :meth:`Encoder.encode <matching.encoder.Encoder.encode>`: which texts go in each batch, their
padded token arrays, and (for a device other than the CPU) a worker thread that prepares them ahead.

Serial, as on a CPU: the texts are tokenised in one call, sorted by token count, and each batch is padded and run
in turn. There the host steps are ~1% of a batch (padding one batch of ~300 titles: ~0.3 ms against ~70 ms of
encoding, 2 cores) and a worker would take a core from torch. On a GPU every host step is time the device waits:
:func:`prefetched` runs them on a worker thread (tokenising a chunk of :data:`CHUNK_TEXTS` texts at a time, sorted
within the chunk, so the first batch does not wait for the whole catalogue's tokens), padding into pinned memory,
and hands the batches over through a bounded queue while the device runs the previous ones.
"""

from __future__ import annotations

import itertools
import queue
import threading
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import torch

T = TypeVar("T")

# encode() batches by padded tokens: batch_size x this many, so short titles go ~300 a batch instead of 64 (fewer,
# fuller calls); never more than batch_size x MAX_ROWS_FACTOR texts; long texts keep batch_size. Measured on 3,000
# product titles (~14 tokens), 'fast', batch_size 64, best of 4: 16 tokens a row (~batch 64) 1.05 s, 32 0.93 s,
# 64 0.91 s, 128 0.99 s, 256 1.39 s (bigger batches fall out of cache).
TOKENS_PER_ROW = 64
MAX_ROWS_FACTOR = 16
# texts the worker tokenises (and sorts by length) at a time: the device waits for the first chunk only. With a
# stand-in device of 5 ms a batch (20,000 generated titles, 2 cores): chunks of 65,536 left it idle through the whole
# tokenisation (no gain on serial); 8,192 and 4,096 let it start after ~45 ms
CHUNK_TEXTS = 4096

# batches prepared ahead of the device (~64 KB each): more than a chunk's, so the worker tokenises the next chunk
# while the device still has batches queued (at 2 the device waited ~43 ms at every chunk's start)
QUEUE_DEPTH = 16
# device results copied back to the host together, this many rows at a time
FLUSH_ROWS = 65_536


@dataclass(frozen=True)
class HostBatch:
    """One batch on the host: which texts (positions in the input) and their padded token ids and mask."""

    rows: np.ndarray
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class Results:
    """encode()'s output rows: a CPU batch's vectors are written at once; a device's are copied back together,
    :data:`FLUSH_ROWS` at a time, so the device is not made to wait on each batch."""

    def __init__(self, out: np.ndarray, *, on_host: bool) -> None:
        self.out = out
        self.on_host = on_host
        self.pending: list[tuple[np.ndarray, torch.Tensor]] = []
        self.rows = 0

    def add(self, rows: np.ndarray, vectors: torch.Tensor) -> None:
        if self.on_host:
            self.out[rows] = vectors.numpy()
            return
        self.pending.append((rows, vectors))
        self.rows += len(rows)
        if self.rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rows = np.concatenate([r for r, _ in self.pending])
        self.out[rows] = torch.cat([v for _, v in self.pending]).cpu().numpy()
        self.pending, self.rows = [], 0


def token_ids(tokenizer: Any, limit: int) -> Callable[[list[str]], list[list[int]]]:
    """A function from texts to their token ids (special tokens added, cut at ``limit`` tokens), as ``tokenizer``
    (a transformers tokenizer) gives them. A fast tokenizer's Rust backend is called directly, through a copy
    of its own, set once: through transformers each call re-checks the backend's settings and converts every
    text's encoding to a dict (20,000 generated titles: 28.9k titles/s against 73.8k, the same ids). The copies
    are shared by every encoder of one tokenizer (multilingual-e5's takes ~0.75 s and ~250 MB) and made again
    when the settings transformers reads on each call change; a backend changed behind the tokenizer's back is
    not seen."""
    settings = (
        limit,
        getattr(tokenizer, "truncation_side", "right"),
        bool(getattr(tokenizer, "split_special_tokens", False)),
        len(tokenizer) if hasattr(tokenizer, "__len__") else 0,
    )
    try:
        known = _COPIES.setdefault(tokenizer, {})
    except TypeError:  # not weakly referable: no sharing
        known = {}
    found = known.get(settings)
    if found is None:
        found = known[settings] = _backend_ids(tokenizer, settings[0], settings[1], settings[2])
    return found


# per tokenizer, its backend copies by the settings they were made with
_COPIES: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Callable[[list[str]], list[list[int]]]]] = (
    weakref.WeakKeyDictionary()
)


def _backend_ids(tokenizer: Any, limit: int, side: str, split: bool) -> Callable[[list[str]], list[list[int]]]:
    def slow(texts: list[str]) -> list[list[int]]:
        ids: list[list[int]] = tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        return ids

    to_str = getattr(getattr(tokenizer, "backend_tokenizer", None), "to_str", None)
    if to_str is None:  # a slow (Python) tokenizer
        return slow
    from tokenizers import Tokenizer

    try:
        own = Tokenizer.from_str(to_str())
    except Exception:  # a component written in Python (a custom pre-tokenizer) cannot be copied
        return slow
    own.no_padding()
    own.enable_truncation(max_length=limit, direction=side)
    own.encode_special_tokens = split
    encode = getattr(own, "encode_batch_fast", own.encode_batch)  # without character offsets, which are not read

    def fast(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in encode(texts)]  # the encoding itself runs in Rust, without the interpreter lock

    return fast


def batch_rows(lengths: np.ndarray, batch_size: int, pad_multiple: int = 1) -> Iterator[np.ndarray]:
    """The positions of each batch, longest texts first: ``batch_size`` x :data:`TOKENS_PER_ROW` padded tokens a
    batch (at least ``batch_size`` texts, at most ``batch_size`` x :data:`MAX_ROWS_FACTOR`); with ``pad_multiple``
    > 1, a batch holds only texts of one padded width."""
    order = np.argsort(-lengths, kind="stable")
    start = 0
    while start < len(order):
        longest = max(1, int(lengths[order[start]]))
        rows = min(max(batch_size, batch_size * TOKENS_PER_ROW // longest), batch_size * MAX_ROWS_FACTOR)
        idx = order[start : start + rows]
        if pad_multiple > 1:  # one padded width a batch: each text is as wide as it would be alone
            widths = -(-lengths[idx] // pad_multiple)
            idx = idx[widths == widths[0]]
        start += len(idx)
        yield idx


def padded(
    rows: list[list[int]], *, pad_id: int, left: bool, multiple: int = 1, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists as one ``(rows, width)`` int64 array and its attention mask: ``width`` the longest row,
    rounded up to a multiple of ``multiple`` but never past ``limit``; padding on the left or the right."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    longest = int(lengths.max())
    rounded = -(-longest // multiple) * multiple
    width = max(longest, min(rounded, limit)) if limit is not None else rounded
    # whole-array steps, not a loop over the rows: on a worker thread ahead of a GPU every Python step holds the
    # interpreter lock the thread driving the device needs
    cols = np.arange(width)
    mask = cols[None, :] >= (width - lengths)[:, None] if left else cols[None, :] < lengths[:, None]
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    input_ids[mask] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    return input_ids, mask.astype(np.int64)


def prefetched(make: Callable[[], Iterator[T]], depth: int = QUEUE_DEPTH) -> Generator[T, None, None]:
    """The items of ``make()``, produced on a worker thread at most ``depth`` ahead of the caller. An exception in
    the worker is raised here; a caller that stops early (an exception, a deadline) stops the worker."""
    items: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: object) -> bool:
        while not stop.is_set():
            try:
                items.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in make():
                if not put("item", item):
                    return
        except BaseException as exc:  # handed to the caller, raised there
            put("error", exc)
            return
        put("done", None)

    worker = threading.Thread(target=work, name="matching-encode-host", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "done":
                return
            if isinstance(value, BaseException):
                raise value
            yield cast(T, value)
    finally:
        stop.set()
        if threading.current_thread() is not worker:  # the collector may close this generator on the worker
            worker.join()
