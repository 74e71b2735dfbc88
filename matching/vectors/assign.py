"""IVF coarse assignment in bfloat16 on CPUs that run it natively (AMX / AVX512-BF16).

Adding vectors to an IVF index first finds each one's nearest centroid: a float32 GEMM of the vectors against
every centroid, most of the add. Here the GEMM runs in bfloat16 through torch (oneDNN), the best
``CANDIDATES`` centroids of each row are re-scored exactly in float32, and the index adds the rows to the lists
found (``IndexIVF.add_core``, what ``add_with_ids`` does after its own assignment). bfloat16 keeps 8
significant bits: two scores may swap when they are closer than its error bound, so a row whose last candidate
lies within that bound of its best (one beyond the candidates might win) is scored against every centroid in
float32 instead. The result is float32's nearest centroid, whatever the data (up to float32's own rounding, which
differs with the order of the sums).

Measured on 2 cores of a Xeon with AMX, the 1M generated product titles' stored vectors against the 4,096
centroids of their IVF4096,SQ8 index: FAISS's assignment 9.6-10.7 s, this one 6.2-7.0 s. With 8 candidates 0.15% of
the rows are settled in full float32 (with 4, 8-9%: 7.2 s; 16 candidates cost more in the top-k than they save).
One row of the million went to another list than FAISS's: two centroids 1.6e-8 apart, where float64 sides with
this one.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

from matching.accel import cpu_has_native_bf16

CANDIDATES = 8  # centroids re-scored in float32 per row
MIN_ROWS = 4096  # fewer rows at once go through FAISS's own assignment (a GEMM too small to gain)
_BLOCK = 1024  # rows a GEMM: 1,024 x 4,096 scores stay in cache for the top-k (16,384 a block: 1.9x slower)
_ADD_CORE_TYPES = (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQ)


def flat_ip_centroids(index: Any) -> np.ndarray | None:
    """The centroids (nlist, d) of ``index``'s coarse quantizer when assignment here applies to it: an IVF index
    itself (no wrapper or pre-transform) of flat, scalar-quantised or PQ codes over inner product, with a flat
    inner-product quantizer. Else None."""
    inner: Any = faiss.downcast_index(index)
    # these types add through IndexIVF.add_core as add_with_ids would; others override add_with_ids (fast-scan
    # packs its codes in blocks, IVFFlatDedup removes duplicates) or are untested here
    if type(inner) not in _ADD_CORE_TYPES or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    quantizer = faiss.downcast_index(inner.quantizer)
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    if quantizer.ntotal != inner.nlist:
        return None
    flat = faiss.vector_to_array(quantizer.codes).view(np.float32)
    return flat.reshape(int(quantizer.ntotal), int(quantizer.d))


def nearest_centroids(vectors: np.ndarray, centroids: np.ndarray, *, candidates: int = CANDIDATES) -> np.ndarray:
    """For each row of ``vectors`` (n, d float32), the index of its highest inner-product centroid (int64, n):
    the top ``candidates`` by a bfloat16 GEMM, the winner among them by float32; a row whose last candidate is
    within bfloat16's error bound of its first (another centroid might still win) is scored against all of them
    in float32."""
    exact = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    rough = exact.to(torch.bfloat16).T.contiguous()
    # bfloat16 keeps 8 significant bits (unit roundoff 2**-8): rounding both inputs moves each product by at most
    # ~2**-7 of it, so the sum by 2**-7 * |x| * |c| (Cauchy-Schwarz), and rounding the output by 2**-8 more: two
    # scores' difference moves by at most 6 * 2**-8 * |x| * |c|; 2**-5 rounds that up (float32 accumulation aside)
    slack = 2.0**-5 * float(exact.norm(dim=1).max()) if len(exact) else 0.0
    n = len(vectors)
    out = np.empty(n, dtype=np.int64)
    take = min(candidates, len(exact))
    buffer = np.empty((min(n, _BLOCK), exact.shape[1]), dtype=np.float32)  # writable (a memmap may not be)
    with torch.inference_mode():
        for start in range(0, n, _BLOCK):
            part = buffer[: min(_BLOCK, n - start)]
            part[:] = vectors[start : start + len(part)]
            block = torch.from_numpy(part)
            rough_top, top = (block.to(torch.bfloat16) @ rough).topk(take, dim=1)
            scores = torch.einsum("nd,nkd->nk", block, exact[top])
            best = top.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
            if take < len(exact):
                spread = rough_top[:, 0].float() - rough_top[:, -1].float()
                unsure = spread <= slack * block.norm(dim=1)
                if bool(unsure.any()):
                    best[unsure] = (block[unsure] @ exact.T).argmax(dim=1)
            out[start : start + len(block)] = best.numpy()
    return out


def add_assigned(index: Any, vectors: np.ndarray, ids: np.ndarray) -> None:
    """``index.add_with_ids(vectors, ids)``, with the coarse assignment done here where it applies
    (:func:`flat_ip_centroids`), the block is big enough, its rows are finite and this CPU runs bfloat16 natively."""
    block = np.ascontiguousarray(vectors, dtype=np.float32)
    labels = np.ascontiguousarray(ids, dtype=np.int64)
    eligible = len(block) >= MIN_ROWS and cpu_has_native_bf16() and bool(np.isfinite(block).all())
    centroids = flat_ip_centroids(index) if eligible else None
    if centroids is None:
        index.add_with_ids(block, labels)  # (FAISS leaves a row that is not finite out of every list)
        return
    lists = nearest_centroids(block, centroids)
    ivf: Any = faiss.downcast_index(index)  # an IndexIVF: flat_ip_centroids found its centroids
    ivf.add_core(len(block), faiss.swig_ptr(block), faiss.swig_ptr(labels), faiss.swig_ptr(lists))
