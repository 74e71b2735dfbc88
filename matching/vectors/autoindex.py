"""The FAISS backend's index for the size: pick a factory from the catalogue size and a memory budget, tune it,
refine exactly.

Small catalogues get an exact ``Flat`` index. Larger ones get an IVF index over compressed codes (SQ8, then SQ6,
SQ4, then PQ as the budget tightens) whose candidates are re-scored exactly against the full-precision title
vectors kept on disk (``vectors.f32``, row index = FAISS id). ``nprobe``/``efSearch`` are tuned at build time to
the smallest value that reaches a target Recall@k of the exact search on sample queries.

HNSW is never chosen automatically: its graph alone costs ~8*M bytes per vector (256 MB at 1M titles, M=32) on
top of the codes, and building it over 1M vectors on two cores takes far longer than IVF's k-means; IVF-SQ8 with
a tuned ``nprobe`` already meets the latency target. A user factory with HNSW is still tuned (``efSearch``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from matching.errors import BundleError
from matching.exact import drop_pages, exact_refine, exact_top_k
from matching.metrics import neighbour_recall, tied_neighbour_recall

# Exact Flat while n * dim <= this: a single-thread Flat query over 2**24 floats (~44k titles at dim 384) takes
# ~2.5 ms on the 2-core reference machine; above it Flat's linear cost dominates the query budget.
FLAT_MAX_FLOATS = 2**24
# Default budget: a third of the full-precision size (4 * dim bytes per vector), and at least 512 MiB;
# i.e. 0.5 GiB per million titles at dim 384, which SQ8 codes fit with room to spare.
DEFAULT_MIN_BUDGET = 512 * 2**20
DEFAULT_BUDGET_FRACTION = 1 / 3
# IVF sizing: ~4 * sqrt(n) lists, a power of two, with at least this many vectors per list (FAISS's k-means
# wants >= 39 training points per centroid) and at most this many lists (the coarse quantizer stays Flat).
MIN_POINTS_PER_LIST = 39
MAX_NLIST = 16_384
TRAIN_POINTS_PER_LIST = 64
MIN_TRAIN = 20_000
PQ_MIN_N = 256 * MIN_POINTS_PER_LIST  # PQ's 256-centroid sub-quantizers need this many training points
_ID_BYTES = 8  # int64 id per vector (IndexIDMap; IVF lists store one more, counted separately)
# Candidates fetched per result before the exact refine, by code type (measured: scripts/tune_index.py).
_REFINE_FACTOR = {"SQ8": 2, "SQ6": 3, "SQ4": 4, "PQ": 8}


@dataclass(frozen=True)
class IndexChoice:
    """A FAISS factory string and how to search it.

    ``refine``: candidates must be re-scored exactly on the stored float32 vectors (lossy codes).
    ``refine_factor``: fetch ``refine_k(k) = refine_factor * k`` candidates from the index for a top ``k``.
    ``train_size``: training sample to give ``index.train`` (0 when the index needs no training).
    ``bytes_per_vector``/``fixed_bytes``: expected index RAM is ``n * bytes_per_vector + fixed_bytes``.
    """

    factory: str
    refine: bool
    refine_factor: int
    bytes_per_vector: float
    fixed_bytes: int
    train_size: int
    search_param: str | None
    reason: str

    def refine_k(self, k: int) -> int:
        """How many candidates to fetch from the index so that the exact refine returns a good top ``k``."""
        return k * self.refine_factor if self.refine else k

    def expected_bytes(self, n: int) -> int:
        """Expected index RAM (about the serialised size) for ``n`` vectors."""
        return int(n * self.bytes_per_vector + self.fixed_bytes)


def default_memory_budget(n: int, dim: int) -> int:
    """The budget used when none is given: max(512 MiB, a third of the float32 vectors' size)."""
    return max(DEFAULT_MIN_BUDGET, int(n * dim * 4 * DEFAULT_BUDGET_FRACTION))


def ivf_nlist(n: int, factor: float = 4.0) -> int:
    """IVF list count for ``n`` vectors: the power of two nearest factor*sqrt(n), >= 39 vectors per list, <= 16384.

    More lists (factor up to 16) scan fewer codes per query at the same recall but cost ~factor**2 in k-means time.
    """
    if n < 2 * MIN_POINTS_PER_LIST:
        return 1
    target: int = 2 ** round(math.log2(factor * math.sqrt(n)))
    cap: int = 2 ** int(math.log2(n // MIN_POINTS_PER_LIST))
    return max(1, min(target, cap, MAX_NLIST))


def _pq_m(dim: int, max_bytes: float) -> int | None:
    """Largest PQ sub-quantizer count m (8-bit codes: m bytes) dividing ``dim``, <= max_bytes and <= dim/2."""
    for m in range(min(int(max_bytes), dim // 2), 0, -1):
        if dim % m == 0 and m >= 4:
            return m
    return None


def choose_index(n: int, dim: int, *, memory_budget_bytes: int | None = None, nlist_factor: float = 4.0) -> IndexChoice:
    """The index for ``n`` vectors of ``dim``: exact Flat while small and within budget, else IVF over codes.

    Codes are tried from the most to the least precise (SQ8, SQ6, SQ4, then PQ with fewer and fewer bytes when
    n is large enough to train it); the first whose expected size fits the budget wins. If none fits, the smallest
    is returned and the reason says so. ``nlist_factor``: IVF lists per sqrt(n) (see :func:`ivf_nlist`).
    """
    if n < 0 or dim < 1:
        raise ValueError(f"need n >= 0 and dim >= 1, got n={n}, dim={dim}")
    budget = default_memory_budget(n, dim) if memory_budget_bytes is None else memory_budget_bytes
    flat_bytes = 4 * dim + _ID_BYTES
    if n * dim <= FLAT_MAX_FLOATS and n * flat_bytes <= budget:
        return IndexChoice(
            factory="Flat",
            refine=False,
            refine_factor=1,
            bytes_per_vector=flat_bytes,
            fixed_bytes=0,
            train_size=0,
            search_param=None,
            reason=f"n*dim={n * dim} <= {FLAT_MAX_FLOATS}: exact Flat is fast enough and fits the budget",
        )
    nlist = ivf_nlist(n, nlist_factor)
    fixed = nlist * dim * 4
    train = min(n, max(MIN_TRAIN, TRAIN_POINTS_PER_LIST * nlist))
    options: list[tuple[str, float, int, int]] = [  # (code, bytes per vector, refine factor, extra fixed bytes)
        ("SQ8", dim, _REFINE_FACTOR["SQ8"], 0),
        ("SQ6", math.ceil(dim * 6 / 8), _REFINE_FACTOR["SQ6"], 0),
        ("SQ4", math.ceil(dim / 2), _REFINE_FACTOR["SQ4"], 0),
    ]
    m = _pq_m(dim, dim / 4) if n >= PQ_MIN_N else None
    while m is not None:
        options.append((f"PQ{m}", m, _REFINE_FACTOR["PQ"], dim * 256 * 4))
        m = _pq_m(dim, m - 1)
    per_list_ids = _ID_BYTES  # the ids an IVF list stores next to each code
    chosen = options[-1]
    fits = False
    for option in options:
        code, code_bytes, _, extra = option
        if n * (code_bytes + per_list_ids + _ID_BYTES) + fixed + extra <= budget:
            chosen, fits = option, True
            break
    code, code_bytes, factor, extra = chosen
    per_vector = code_bytes + per_list_ids + _ID_BYTES
    why = "Flat over budget" if n * dim <= FLAT_MAX_FLOATS else f"n*dim={n * dim} > {FLAT_MAX_FLOATS}"
    fit = (
        f"{code} fits the {budget / 2**20:.0f} MiB budget"
        if fits
        else f"nothing fits the {budget / 2**20:.0f} MiB budget; smallest code {code} chosen"
    )
    return IndexChoice(
        factory=f"IVF{nlist},{code}",
        refine=True,
        refine_factor=factor,
        bytes_per_vector=per_vector,
        fixed_bytes=fixed + extra,
        train_size=train,
        search_param="nprobe",
        reason=f"{why}: IVF with {nlist} lists (~{nlist_factor:g}*sqrt(n)); {fit} "
        f"(~{(n * per_vector + fixed + extra) / 2**20:.0f} MiB); exact refine of {factor}x candidates",
    )


def choice_for_factory(factory: str, n: int) -> IndexChoice:
    """An :class:`IndexChoice` for a user-given factory string (override): refine when its codes are lossy."""
    code = factory.split(",")[-1].strip()
    lossy = re.match(r"(SQ|PQ|RQ|PRQ|LSQ|PLSQ|LSH|RaBitQ)", code) is not None and code not in ("SQfp32",)
    if not lossy:
        factor = 1
    elif code.startswith(("SQ8", "SQfp16", "SQbf16")):
        factor = _REFINE_FACTOR["SQ8"]
    elif code.startswith(("SQ6", "SQ4")):
        factor = _REFINE_FACTOR[code[:3]]
    else:
        factor = _REFINE_FACTOR["PQ"]
    param = "nprobe" if "IVF" in factory else "efSearch" if "HNSW" in factory else None
    ivf = re.search(r"IVF(\d+)", factory)
    train = TRAIN_POINTS_PER_LIST * int(ivf.group(1)) if ivf else 0
    if lossy and code.startswith(("PQ", "RQ", "PRQ", "LSQ", "PLSQ")):
        train = max(train, PQ_MIN_N)
    return IndexChoice(
        factory=factory,
        refine=lossy,
        refine_factor=factor,
        bytes_per_vector=float("nan"),
        fixed_bytes=0,
        train_size=min(n, max(MIN_TRAIN, train)),
        search_param=param,
        reason="user override",
    )


class FileRows:
    """Rows of a float32 matrix file read with ``pread``: like the memmap it wraps for indexing, but what it
    reads never becomes resident memory of the process (scattered reads through a memmap map whole
    fault-around windows, so tuning's few hundred thousand candidate reads made most of a 1M file resident)."""

    def __init__(self, memmap: np.ndarray) -> None:
        self.path = str(memmap.filename)  # type: ignore[attr-defined]
        self.offset = int(memmap.offset)  # type: ignore[attr-defined]
        self.shape = memmap.shape
        self.row_bytes = int(memmap.shape[1]) * 4

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, _ = key.indices(len(self))
            block = np.empty((max(0, stop - start), self.shape[1]), dtype=np.float32)
            self._read([(block, start)] if block.size else [])
            return block
        n = len(self)
        rows = np.atleast_1d(np.asarray(key, dtype=np.int64))
        if len(rows) and not (-n <= int(rows.min()) and int(rows.max()) < n):
            got = f"{rows.min()} to {rows.max()}"
            raise IndexError(f"rows of {self.path!r} are 0 to {n - 1} (or -{n} to -1), got {got}")
        rows = np.where(rows < 0, rows + n, rows)
        # each distinct row once, in file order, and a run of consecutive rows in one read
        unique, inverse = np.unique(rows, return_inverse=True)
        block = np.empty((len(unique), self.shape[1]), dtype=np.float32)
        cuts = (np.flatnonzero(np.diff(unique) != 1) + 1).tolist()
        runs = zip([0, *cuts], [*cuts, len(unique)], strict=True)
        self._read([(block[lo:hi], int(unique[lo])) for lo, hi in runs if hi > lo])
        return block if np.array_equal(unique, rows) else block[inverse]

    def _read(self, parts: list[tuple[np.ndarray, int]]) -> None:
        """Fill each (rows, first row) of ``parts`` from the file."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for rows, first in parts:
                view, done = rows.data.cast("B"), 0
                while done < len(view):  # straight into the array: no bytes object to copy
                    got = os.preadv(fd, [view[done:]], self.offset + first * self.row_bytes + done)
                    if not got:
                        raise BundleError(f"{self.path!r} ends before row {first + len(rows)}: the file is damaged")
                    done += got
        finally:
            os.close(fd)


def file_rows(vectors: np.ndarray) -> Any:
    """``vectors`` read through :class:`FileRows` when it is a memmap of a file, else as it is."""
    return FileRows(vectors) if isinstance(vectors, np.memmap) and vectors.filename else vectors


# -- tuning ---------------------------------------------------------------------------------------------------------


def sample_queries(
    vectors: np.ndarray, count: int = 500, *, noise: float | tuple[float, float] = (0.3, 1.5), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` tuning queries: random stored vectors plus isotropic Gaussian noise, re-normalised.

    A stored vector as its own query is too easy (it sits in its own IVF cell, its self-match is free). Real
    queries are short texts whose vectors lie off the titles (cosine ~0.5-0.9 to their best titles), so each sample
    gets noise of total norm ``noise`` (a float, or drawn uniformly per query from a (low, high) range); its cosine
    to the source is then ~1/sqrt(1 + noise**2): 0.96 at 0.3, 0.8 at 0.75, 0.55 at 1.5. That moves queries
    towards cell boundaries and makes the tuned ``nprobe`` hold for near-duplicate and loose queries alike.
    Returns (queries, source rows).
    """
    rng = np.random.default_rng(seed)
    n, dim = vectors.shape
    rows = np.sort(rng.choice(n, size=min(count, n), replace=False))
    q = np.asarray(vectors[rows], dtype=np.float32).copy()
    lo, hi = (noise, noise) if isinstance(noise, int | float) else noise
    scale = rng.uniform(lo, hi, size=(len(q), 1)) / math.sqrt(dim)
    if hi > 0:
        q += rng.standard_normal(q.shape).astype(np.float32) * scale.astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, rows


def core_index(index: Any) -> Any:
    """The index that holds the search parameters: through IndexIDMap/IndexIDMap2 wrappers, the IVF index inside
    (where there is one), else the index itself."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        index = faiss.downcast_index(index.index)
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return index


def search_param_range(index: Any) -> tuple[str | None, int]:
    """The tunable search parameter of ``index`` and its largest useful value: nprobe (<= nlist), efSearch, none."""
    inner = core_index(index)
    try:
        ivf = faiss.extract_index_ivf(inner)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        return "nprobe", int(ivf.nlist)
    if hasattr(inner, "hnsw"):
        return "efSearch", 4096
    return None, 0


def set_search_param(index: Any, name: str, value: int) -> None:
    """Set ``name`` (nprobe/efSearch) on ``index``, through an IndexIDMap wrapper, as ``VectorIndex`` does."""
    faiss.ParameterSpace().set_index_parameter(core_index(index), name, int(value))


def retrieve(
    index: Any,
    queries: np.ndarray,
    k: int,
    *,
    stored_vectors: np.ndarray | None = None,
    candidates: int | None = None,
    params: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` from ``index``; with ``stored_vectors``, fetch ``candidates`` (>= k) and refine them exactly.

    ``params`` are FAISS per-call search parameters (a filter's selector, say).
    """
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if stored_vectors is None:
        scores, ids = index.search(q, k, params=params)
        return scores, ids
    fetch = max(k, candidates or k)
    _, cand = index.search(q, min(fetch, max(1, int(index.ntotal))), params=params)
    return exact_refine(q, cand, stored_vectors, k)


def tune_search_params(
    index: Any,
    sample_queries: np.ndarray,
    exact_top_ids: np.ndarray,
    *,
    k: int = 10,
    target_recall: float = 0.95,
    refine: np.ndarray | None = None,
    candidates: int | None = None,
    max_value: int | None = None,
    exact_top_scores: np.ndarray | None = None,
    start: int = 1,
) -> dict[str, Any]:
    """The smallest nprobe (IVF) or efSearch (HNSW) whose Recall@k against ``exact_top_ids`` reaches the target.

    ``index`` is a FAISS index (IndexIDMap-wrapped or not). With ``refine`` (the stored vectors, row = id), each
    query fetches ``candidates`` from the index and keeps the exact top ``k`` of them, as the search path will.
    Values are doubled from ``start`` until the target is reached, then bisected (from 0 where ``start`` reaches
    it), so ``value - 1`` was measured to miss it (unless ``value`` is 1). With ``refine`` and
    ``exact_top_scores`` (the exact top ``k``'s scores), recall lets equal rows stand for each other
    (:func:`tied_neighbour_recall`). The index is left set to the returned value. Returns ``{"param", "value",
    "recall", "target_recall", "k", "candidates", "reached", "evaluated"}``; ``param`` is None for exact indexes.
    """
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    name, top = search_param_range(index)
    if max_value is not None:
        top = min(top, max_value) if name else top
    evaluated: dict[int, float] = {}

    def recall(value: int | None) -> float:
        if name is not None and value is not None:
            set_search_param(index, name, value)
        scores, found = retrieve(index, sample_queries, k, stored_vectors=refine, candidates=candidates)
        if refine is not None:
            drop_pages(refine)  # the refine read rows all over the file: keep them out of resident memory
        if refine is not None and exact_top_scores is not None:  # the refine's scores are exact
            r = tied_neighbour_recall(found, scores, exact_top_ids, exact_top_scores, k)
        else:
            r = neighbour_recall(found, exact_top_ids, k)
        if value is not None:
            evaluated[value] = r
        return r

    result: dict[str, Any] = {
        "param": name,
        "target_recall": target_recall,
        "k": k,
        "candidates": max(k, candidates or k) if refine is not None else k,
    }
    if name is None:
        r = recall(None)
        return {**result, "value": None, "recall": r, "reached": r >= target_recall, "evaluated": {}}
    lo, hi = 0, max(1, min(start, top))  # invariant once hi passes: lo fails (or is 0), hi passes
    while recall(hi) < target_recall:
        if hi >= top:
            return {**result, "value": hi, "recall": evaluated[hi], "reached": False, "evaluated": evaluated}
        lo, hi = hi, min(2 * hi, top)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if recall(mid) >= target_recall:
            hi = mid
        else:
            lo = mid
    set_search_param(index, name, hi)
    return {
        **result,
        "value": hi,
        "recall": evaluated[hi],
        "reached": True,
        "evaluated": dict(sorted(evaluated.items())),
    }


# where build-time tuning starts doubling nprobe: the 1M product titles' IVF4096,SQ8 tunes to 6 after 1, 2, 4, 8,
# 6 and 5 (each ~0.55 s, the refine's reads most of it); from 4, after 4, 8, 6 and 5. From 4 a value of 1 or 2
# costs one evaluation more, of 3 or more as many or fewer
NPROBE_START = 4


def auto_tune(
    index: Any,
    stored_vectors: np.ndarray,
    choice: IndexChoice,
    *,
    k: int = 10,
    candidates: int = 100,
    target_recall: float = 0.95,
    margin: float = 0.01,
    n_queries: int = 500,
    noise: float | tuple[float, float] = (0.3, 1.5),
    seed: int = 0,
) -> dict[str, Any]:
    """Build-time tuning: sample noisy title queries, find their exact top ``k``, and tune ``index`` for them.

    ``candidates`` is what search asks the index for (before the refine multiplies it by ``choice.refine_factor``),
    so the tuned value is the one the real search path needs for Recall@k >= ``target_recall``. The sample is
    tuned to ``target_recall + margin`` (capped at 1): the smallest value that just reaches the target on 500
    sample queries lands a little below it on other queries about half the time.
    """
    stored_vectors = file_rows(stored_vectors)
    queries, _ = sample_queries(stored_vectors, n_queries, noise=noise, seed=seed)
    exact_scores, exact = exact_top_k(stored_vectors, queries, k, screened=True)
    return tune_search_params(
        index,
        queries,
        exact,
        k=k,
        target_recall=min(1.0, target_recall + margin),
        refine=stored_vectors if choice.refine else None,
        candidates=choice.refine_k(max(k, candidates)),
        exact_top_scores=exact_scores,
        start=NPROBE_START if choice.search_param == "nprobe" else 1,
    )
