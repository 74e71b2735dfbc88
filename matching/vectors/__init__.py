"""Vector index backends behind one protocol (:class:`VectorIndex`); a new backend is one module here plus one
:func:`register` line below."""

from matching.vectors.base import VectorIndex, backend, backends, index_files, register
from matching.vectors.exact import ExactIndex
from matching.vectors.faiss import AUTO, FaissIndex, resolve

register("faiss", FaissIndex)
register("exact", ExactIndex)

__all__ = [
    "AUTO",
    "ExactIndex",
    "FaissIndex",
    "VectorIndex",
    "backend",
    "backends",
    "index_files",
    "register",
    "resolve",
]
