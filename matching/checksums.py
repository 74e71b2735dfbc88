"""Checksums of bundle files: SHA-256 of a whole file or of a prefix, and of an append-only file block by block (a
change hashes only its last block and the new ones)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from matching.background import Background
from matching.errors import BundleError


class Checksummed(Protocol):
    """What a manifest says of its files (:class:`matching.bundle.Manifest`)."""

    files: dict[str, str]
    sizes: dict[str, int]
    growable: list[str]
    blocks: dict[str, list[str]]
    block_bytes: int


# the append-only vector file is checksummed in blocks of this many bytes: a change hashes only the last, partial
# block and the appended ones, and takes its base's digests for the others (1M titles: hashing the whole 1.5 GB
# prefix on every change, and verifying it first, took ~2 s of a one-title add's 3.9 s). A change checks and
# hashes its last block twice: with 64 MiB blocks that was 23-91 ms of a one-title change at 1M titles, by how
# full the last block was; with 4 MiB at most ~6 ms (a 1.5 GB file has 367 digests in the manifest)
BLOCK_BYTES = 4 << 20
LEGACY_BLOCK_BYTES = 64 << 20  # the block of manifests that do not say theirs (format 2)
_HASH_QUEUE_DEPTH = 4  # writes waiting for the hasher (a build writes one a chunk: 20,000 vectors, ~30 MB)


def read_span(fh: BinaryIO, size: int | None, step: int = 1 << 20) -> Iterator[bytes]:
    """The next ``size`` bytes of ``fh`` (to its end where None or shorter), ``step`` bytes at a time."""
    left = -1 if size is None else size
    while left != 0:
        chunk = fh.read(step if left < 0 else min(step, left))
        if not chunk:
            return
        yield chunk
        left = left - len(chunk) if left > 0 else left


def _sha256_span(fh: BinaryIO, size: int | None) -> str:
    h = hashlib.sha256()
    for chunk in read_span(fh, size):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path, size: int | None = None) -> str:
    """SHA-256 of the file, or of its first ``size`` bytes."""
    with path.open("rb") as fh:
        return _sha256_span(fh, size)


def block_digests(
    path: Path, size: int, reuse: list[str] | tuple[str, ...] = (), block: int | None = None
) -> list[str]:
    """SHA-256 of each ``block``-byte block (default :data:`BLOCK_BYTES`) of the first ``size`` bytes of ``path``
    (the last one shorter); the first ``len(reuse)`` digests are taken as given (full blocks of an append-only file,
    checked before)."""
    block = block or BLOCK_BYTES
    out = list(reuse[: full_blocks(size, block)])
    with path.open("rb") as fh:
        fh.seek(len(out) * block)
        for start in range(len(out) * block, size, block):
            out.append(_sha256_span(fh, min(block, size - start)))
    return out


def full_blocks(size: int, block: int | None = None) -> int:
    """How many whole ``block``-byte blocks (default :data:`BLOCK_BYTES`) the first ``size`` bytes of a file hold."""
    return size // (block or BLOCK_BYTES)


def blocks_digest(blocks: list[str]) -> str:
    """The ``files`` entry of a file checksummed in blocks: one digest over its block digests."""
    return "blocks:" + hashlib.sha256("\n".join(blocks).encode()).hexdigest()


def verify_files(
    generation: Path, manifest: Checksummed, names: Iterable[str] | None = None, *, last_block_only: bool = False
) -> None:
    """Check ``names`` (default: every file the manifest lists) against their checksums; BundleError naming the
    first that fails. ``last_block_only``: of a file checksummed in blocks, only its last block, the one a change
    that appends hashes again (the others keep their digests in the next manifest, so damage there stays seen)."""
    for name in manifest.files if names is None else names:
        if name not in manifest.files:
            continue
        digest = manifest.files[name]
        file = generation / name
        if file.is_symlink():
            raise BundleError(f"bundle file {str(file)!r} is a symbolic link; a bundle holds regular files only")
        if not file.is_file():
            raise BundleError(f"bundle file {str(file)!r} is missing")
        size = manifest.sizes.get(name)
        actual = file.stat().st_size
        if size is not None and (actual < size or (actual > size and name not in manifest.growable)):
            raise BundleError(f"bundle file {str(file)!r} is damaged: it holds {actual} bytes, expected {size}")
        blocks = manifest.blocks.get(name)
        if blocks is not None and size is not None:
            skip = max(0, len(blocks) - 1) if last_block_only else 0
            found = block_digests(file, size, blocks[:skip], manifest.block_bytes)
            good = found == blocks and blocks_digest(blocks) == digest
        else:
            good = sha256_file(file, size if name in manifest.growable else None) == digest
        if not good:
            raise BundleError(f"bundle file {str(file)!r} is damaged: its checksum does not match the manifest")


class BlockHasher:
    """The digests of an append-only file's whole ``block``-byte blocks, hashed from the bytes as they are written,
    in a worker thread (hashlib lets go of the interpreter lock): a build no longer reads its vector file back to
    hash it after the encoding (1M titles: 1.5 GB, 2.3 s on 2 cores of a Xeon). :meth:`digests` ends the worker."""

    def __init__(self, block: int | None = None) -> None:
        self.block = block or BLOCK_BYTES
        self._digests: list[str] = []
        self._hash, self._filled = hashlib.sha256(), 0
        self._worker = Background(self._take, depth=_HASH_QUEUE_DEPTH, name="matching-hasher", what="block hasher")

    def write(self, data: bytes) -> None:
        """The next bytes of the file."""
        self._worker.put(data)

    def digests(self) -> list[str]:
        """The digests of the whole blocks written (a last, partial block is left to :func:`block_digests`)."""
        self._worker.join()
        self._worker.check()
        return list(self._digests)

    def close(self) -> None:
        self._worker.join()

    def _take(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            take = min(len(view), self.block - self._filled)
            self._hash.update(view[:take])
            view, self._filled = view[take:], self._filled + take
            if self._filled == self.block:
                self._digests.append(self._hash.hexdigest())
                self._hash, self._filled = hashlib.sha256(), 0
