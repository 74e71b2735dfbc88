"""Bundle directory layout, manifest, checksums and the atomic swap of generations.

A bundle is a directory holding numbered generations and a ``CURRENT`` file naming the live one::

    indexes/products/
        CURRENT            -> "gen-000002"
        gen-000002/        manifest.json + each component's files

A new generation is written beside the live one, flushed to disk, and published by atomically
replacing ``CURRENT``; a crash before that leaves the old generation live and untouched.

Published generations are never modified, with one exception: the vector file is append-only and
hard-linked from one generation to the next, and each manifest checksums only the prefix its
generation uses. Writers take an exclusive lock (``.NAME.lock`` beside the bundle) for the whole
change, so a second writer waits or gets :class:`BundleLockedError`. Readers hold a shared ``flock``
on their generation's manifest (a :class:`Lease`); writers delete an old generation only once no
reader holds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from matching import checksums
from matching.checksums import LEGACY_BLOCK_BYTES, blocks_digest, sha256_file, verify_files
from matching.errors import BundleError, BundleLockedError
from matching.layout import MANIFEST_FILE, POINTER_FILE, STORE_DELTA
from matching.types import Fusion

# 2: growable files are checksummed in blocks (``blocks``); a version-1 bundle (one digest over the prefix) still loads
# 3: the generation holds a delta over its base files (``delta.sqlite``, matching.delta), which a reader of format 2
# would ignore (answering from the base files alone), or blocks of another size than 64 MiB (``block_bytes``);
# other generations are still written as 2
FORMAT_VERSION = 3
_BLOCKS_FORMAT = 2
DEFAULT_LOCK_TIMEOUT = 30.0
# six digits or more: the name after gen-999999 is gen-1000000 (numbers, not names, are compared)
_GEN = re.compile(r"gen-(\d{6,})\Z")


@dataclass
class Manifest:
    """What a generation holds; written last, so its presence means the generation is complete."""

    library_version: str
    encoder: dict[str, Any]
    dim: int
    count: int
    index: dict[str, Any]
    id_type: str
    source: dict[str, Any] = field(default_factory=dict)
    query_encoder: dict[str, Any] | None = None
    # the BM25 index: analyser, parameters and the fusion weight (None: a bundle from before hybrid retrieval)
    lexical: dict[str, Any] | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION
    files: dict[str, str] = field(default_factory=dict)
    # byte length covered by each checksum; a file listed in ``growable`` may be longer (append-only)
    sizes: dict[str, int] = field(default_factory=dict)
    growable: list[str] = field(default_factory=list)
    # per growable file, the SHA-256 of each block of its prefix (``files`` then holds blocks_digest)
    blocks: dict[str, list[str]] = field(default_factory=dict)
    # the block's bytes: kept by the changes of a file (their digests are reused), chosen anew where it is written
    block_bytes: int = LEGACY_BLOCK_BYTES

    @property
    def factory(self) -> str:
        """The index in a word: the FAISS factory string, or the name of another vector backend."""
        backend = str(self.index.get("backend", "faiss"))
        return str(self.index.get("factory", "")) if backend == "faiss" else backend

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """A manifest from its JSON, every field checked for its type (a damaged or crafted one is refused)."""
        if not isinstance(data, dict):
            raise TypeError(f"a manifest is a JSON object, not {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        for name, kinds in _FIELD_TYPES.items():
            if name in fields and not _is(fields[name], kinds):
                raise TypeError(f"field {name!r} is {fields[name]!r}, not {' or '.join(k.__name__ for k in kinds)}")
        blocks = fields.get("blocks", {})
        if not all(isinstance(v, list) and all(isinstance(d, str) for d in v) for v in blocks.values()):
            raise TypeError("its block checksums must be lists of text")
        for name in (*fields.get("files", {}), *fields.get("sizes", {}), *fields.get("growable", []), *blocks):
            if not isinstance(name, str) or not _FILE_NAME.match(name):
                raise TypeError(f"it names the file {name!r}; a bundle's files are plain names inside its generation")
        if not all(isinstance(v, str) for v in fields.get("files", {}).values()) or not all(
            _is(v, (int,)) and v >= 0 for v in fields.get("sizes", {}).values()
        ):
            raise TypeError("its file checksums must be text and its sizes whole numbers >= 0")
        if any(_is(fields.get(k, 1), (int,)) and fields.get(k, 1) < 0 for k in ("dim", "count")):
            raise TypeError("dim and count must be >= 0")
        if fields.get("block_bytes", LEGACY_BLOCK_BYTES) < 1:
            raise TypeError("block_bytes must be >= 1")
        lexical = fields.get("lexical") or {}
        for key, (low, high) in _FUSION_RANGES.items():  # every search reads them: inf or NaN would reach scores
            if not _is(value := lexical.get(key, low), (int, float)) or not low <= value <= high:
                raise TypeError(f"its lexical entry {key!r} is {value!r}, not a number in [{low:g}, {high:g}]")
        if not isinstance(fusion := lexical.get("fusion", Fusion.FIXED), str) or fusion not in set(Fusion):
            raise TypeError(f"its lexical entry 'fusion' is {fusion!r}, not one of {[f.value for f in Fusion]}")
        return cls(**fields)


_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
# the untrained fusion's numbers (matching.features; the scorer's config checks the same ranges)
_FUSION_RANGES = {"dense_weight": (0, 1), "dense_floor": (0, 1), "dense_span": (0, 1e6), "known_power": (1, 10)}
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "library_version": (str,),
    "encoder": (dict,),
    "dim": (int,),
    "count": (int,),
    "index": (dict,),
    "id_type": (str,),
    "source": (dict,),
    "query_encoder": (dict, type(None)),
    "lexical": (dict, type(None)),
    "created_at": (str,),
    "format_version": (int,),
    "files": (dict,),
    "sizes": (dict,),
    "growable": (list,),
    "blocks": (dict,),
    "block_bytes": (int,),
}
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM}
_CHECKSUM = "checksum"  # the manifest's own SHA-256, over its JSON without this key


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def _own_checksum(data: dict[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != _CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a bundle: a ``CURRENT`` file that names one of its ``gen-N`` directories (any other
    folder that happens to hold a file called CURRENT is not one, and is never overwritten as one)."""
    name = _read_pointer(Path(path))
    return name is not None and _GEN.match(name) is not None and (Path(path) / name).is_dir()


def enclosing_bundle(path: Path) -> Path | None:
    """The bundle that ``path`` is, or lies inside (an output must never be written there), else ``None``."""
    for candidate in [Path(path).resolve(), *Path(path).resolve().parents]:
        if is_bundle(candidate):
            return candidate
    return None


def current_generation(path: Path) -> Path:
    """The live generation directory of the bundle at ``path``."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle {str(path)!r} does not exist; build one with Matcher.build / matching build")
    if not path.is_dir():
        raise BundleError(f"{str(path)!r} is a file, not a bundle directory")
    pointer = path / POINTER_FILE
    if not pointer.is_file():
        raise BundleError(
            f"{str(path)!r} is not a bundle (it has no {POINTER_FILE} file); "
            "pass the directory that Matcher.build / matching build created"
        )
    name = _read_pointer(path)
    if name is None:
        raise BundleError(f"cannot read {str(pointer)!r}: it is not a generation name; restore it or rebuild")
    gen = path / name
    if not _GEN.match(name) or gen.is_symlink() or not (gen / MANIFEST_FILE).is_file():
        raise BundleError(
            f"bundle {str(path)!r}: its {POINTER_FILE} names {name!r}, which is not a complete generation"
        )
    return gen


def read_manifest(generation: Path, *, verify: bool = True) -> Manifest:
    """Read a generation's manifest; with ``verify``, check every file against its checksum."""
    where = str(generation / MANIFEST_FILE)
    try:
        data = json.loads((generation / MANIFEST_FILE).read_text(encoding="utf-8"))
        if isinstance(data, dict) and _CHECKSUM in data and data[_CHECKSUM] != _own_checksum(data):
            raise BundleError(f"bundle file {where!r} is damaged: its own checksum does not match its content")
        manifest = Manifest.from_dict(data)
    except (OSError, ValueError, TypeError, RecursionError) as exc:  # ValueError: bad JSON or bytes not UTF-8
        raise BundleError(f"cannot read {where!r}: {exc}; restore the bundle or rebuild it") from None
    if manifest.format_version > FORMAT_VERSION:
        raise BundleError(
            f"bundle format {manifest.format_version} is newer than this library reads ({FORMAT_VERSION}); "
            "upgrade matching"
        )
    if verify:
        verify_files(generation, manifest)
    return manifest


def write_manifest(
    generation: Path,
    manifest: Manifest,
    *,
    prefixes: dict[str, int] | None = None,
    known: dict[str, tuple[str, int]] | None = None,
    known_blocks: dict[str, list[str]] | None = None,
) -> None:
    """Checksum every file in ``generation`` into ``manifest`` and write it (last).

    ``prefixes`` names append-only files and the byte length this generation uses of each (checksummed in blocks);
    ``known`` gives the (digest, size) of files already checksummed (hard links to a checked generation's files),
    ``known_blocks`` the digests of full blocks an append-only file shares with such a generation.
    """
    prefixes, known, known_blocks = prefixes or {}, known or {}, known_blocks or {}
    manifest.files, manifest.sizes, manifest.blocks = {}, {}, {}
    # written now, so in this format (blocks), whatever it was read from; 3 only where a reader of 2 would misread it
    legacy = manifest.block_bytes == LEGACY_BLOCK_BYTES and not (generation / STORE_DELTA).is_file()
    manifest.format_version = _BLOCKS_FORMAT if legacy else FORMAT_VERSION
    for p in sorted(generation.iterdir()):
        if p.is_file() and p.name != MANIFEST_FILE:
            size = prefixes.get(p.name, p.stat().st_size)
            if p.name in prefixes:
                blocks = checksums.block_digests(p, size, known_blocks.get(p.name, []), manifest.block_bytes)
                manifest.blocks[p.name] = blocks
                manifest.files[p.name] = blocks_digest(blocks)
            elif p.name in known and known[p.name][1] == size:
                manifest.files[p.name] = known[p.name][0]
            else:
                manifest.files[p.name] = sha256_file(p, size)
            manifest.sizes[p.name] = size
    manifest.growable = sorted(prefixes)
    data = manifest.to_dict()
    data[_CHECKSUM] = _own_checksum(data)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    (generation / MANIFEST_FILE).write_text(text, encoding="utf-8")


class Lease:
    """A reader's shared lock on one generation: writers do not delete a generation while it is held."""

    def __init__(self, generation: Path, fd: int) -> None:
        self.generation = generation
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lease_current(path: Path, *, attempts: int = 200) -> Lease:
    """Lease the live generation of the bundle at ``path`` (retrying while a writer swaps it)."""
    path = Path(path).resolve()
    for attempt in range(attempts):
        pointer = _read_pointer(path)
        try:
            gen = current_generation(path)
        except BundleError:
            # CURRENT named a generation that a writer replaced and began deleting meanwhile: read it again
            if attempt == attempts - 1 or _read_pointer(path) in (pointer, None):
                raise
            continue
        manifest = gen / MANIFEST_FILE
        try:
            fd = os.open(manifest, os.O_RDONLY)
        except FileNotFoundError:
            continue  # replaced and deleted between reading CURRENT and opening it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            # a writer deletes the manifest first while it holds the exclusive lock: if the file we
            # locked is still the one at that path, the generation is complete and now protected
            if os.stat(manifest).st_ino == os.fstat(fd).st_ino:
                return Lease(gen, fd)
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(fd)
        time.sleep(0.005)
    raise BundleError(f"could not open a stable generation of bundle {str(path)!r}: it keeps changing; try again")


def live_name(path: Path) -> str | None:
    """The name ``CURRENT`` holds (not checked; ``None`` if there is none): a cheap "has it changed?"."""
    return _read_pointer(Path(path))


def _read_pointer(path: Path) -> str | None:
    try:
        return (path / POINTER_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):  # missing, unreadable, or damaged bytes: no generation named
        return None


def lock_path(path: Path) -> Path:
    """The writers' lock file of the bundle at ``path`` (beside it, so a first build can take it too)."""
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def writer_lock(path: Path, *, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the bundle's exclusive writer lock, waiting up to ``timeout`` seconds for another writer.

    If no bundle exists when the lock is released (a first build that failed), the lock file is
    removed too, so a failed build leaves nothing behind; a waiter that then gets the lock on the
    removed file notices and locks the new one.
    """
    path = Path(path).resolve()  # one lock file however the path is spelled
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(path)
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise BundleLockedError(
                    f"bundle {str(path)!r} is being changed by another writer; "
                    f"waited {timeout:g} s. Try again when it has finished (or raise lock_timeout)"
                ) from None
            time.sleep(0.05)
            continue
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed that file: lock the current one
    try:
        yield
    finally:
        try:
            if not is_bundle(path):
                lock.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing the descriptor drops the lock


def check_target(path: Path, *, overwrite: bool) -> None:
    """Fail early, before any work, if building into ``path`` would clobber something."""
    if not path.exists():
        return
    if not path.is_dir():
        raise BundleError(f"{str(path)!r} is a file; choose a directory path for the bundle")
    if is_bundle(path):
        if not overwrite:
            raise BundleError(f"bundle {str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it")
        return
    entries = list(path.iterdir())
    if not entries or (all(_LEFTOVER.match(p.name) for p in entries) and not (path / POINTER_FILE).exists()):
        return  # empty, or what a killed build in place left: nothing of anyone else's
    if (
        overwrite
        and (path / POINTER_FILE).is_file()
        and all(_LEFTOVER.match(p.name) or p.name == POINTER_FILE for p in entries)
        and any(_GEN.match(p.name) and p.is_dir() for p in entries)  # a bundle's footprint, not a stray file
    ):
        return  # a bundle whose CURRENT is damaged: --overwrite rebuilds it, as its error message says
    raise BundleError(f"{str(path)!r} exists and is not a bundle; choose an empty or new directory")


# what a bundle folder holds besides CURRENT: generations, and a killed writer's staging or pointer files
_LEFTOVER = re.compile(r"(\.?gen-\d{6,}(\.staging-.*)?|\.CURRENT\.tmp)\Z")


class Unchanged(Exception):  # noqa: N818 - a signal, not an error
    """Raised inside :func:`new_generation` by a change that changes nothing: the staging generation is deleted,
    nothing is published, and the ``with`` block ends quietly."""


@contextlib.contextmanager
def new_generation(
    path: Path,
    *,
    overwrite: bool = False,
    base: Path | None = None,
    change: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    verify_live: bool = True,
) -> Iterator[Path]:
    """Yield a directory to write a generation into; publish it atomically on success.

    The writer lock is held throughout (:mod:`matching.generation` fills and finishes the directory).
    With ``base``, the change was computed from that generation and is refused if another writer
    published since. With ``change``, the bundle must exist and the body derives the new generation
    from the live one, which it reads under the lock. On any exception the partial generation is
    deleted and whatever was live stays live; :class:`Unchanged` does that without propagating. The live
    generation's files are verified first, unless ``verify_live`` is false: then the body checks those it reads
    (:func:`verify_files`).
    """
    path = Path(path).resolve()
    try:
        with writer_lock(path, timeout=lock_timeout):
            _remove_leftovers(path)
            with _new_generation(path, overwrite=overwrite, base=base, change=change, verify=verify_live) as staging:
                yield staging
            collect_garbage(path, lock=False)
    except Unchanged:
        return
    except (OSError, sqlite3.Error, OperationalError) as exc:  # disk full, read-only: the live one is untouched
        if isinstance(exc, OSError) and exc.errno not in _DISK_ERRORS:
            raise
        if isinstance(exc, OSError):
            what = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        else:  # SQLite says "database or disk is full" or "disk I/O error"
            what = f"the store could not be written ({str(getattr(exc, 'orig', None) or exc).splitlines()[0]})"
        raise BundleError(
            f"writing bundle {str(path)!r} failed: {what}. Nothing was published; the bundle is as it was. "
            "Free space or make the folder writable, then try again"
        ) from exc


@contextlib.contextmanager
def _new_generation(path: Path, *, overwrite: bool, base: Path | None, change: bool, verify: bool) -> Iterator[Path]:
    if base is not None or change:
        live = current_generation(path)
        if base is not None and live.name != base.name:
            raise BundleError(
                f"bundle {str(path)!r} changed since this change was prepared ({base.name} -> {live.name}); "
                "reload it and try again"
            )
        # a change rewrites files from the live generation's: check them first, or a damaged file would be blessed
        # by the new manifest
        read_manifest(live, verify=verify)
    else:
        check_target(path, overwrite=overwrite)
    fresh = not is_bundle(path)
    # an empty directory that exists (check_target allowed it) is built in place: replacing it would pull it
    # from under a shell or process whose working directory it is (`matching build ... --out .`)
    in_place = fresh and path.is_dir()
    if in_place:
        root = path
        for leftover in path.iterdir():  # check_target allowed only generations and staging leftovers here
            shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
        number = 1
    elif fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
        number = 1
    else:
        root = path
        numbers = [int(m.group(1)) for p in path.iterdir() if (m := _GEN.match(p.name))]
        number = max(numbers, default=0) + 1
    final_name = f"gen-{number:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final_name}.staging-", dir=root))
    try:
        yield staging
        if not (staging / MANIFEST_FILE).is_file():
            raise BundleError("internal error: a generation was finished without a manifest")
        for file in staging.iterdir():
            _fsync(file)
        _share(staging, root if fresh and not in_place else None)
        _fsync(staging)
        staging.rename(root / final_name)
        _fsync(root)
        _point(root, final_name)
        if fresh and not in_place:
            root.rename(path)
            _fsync(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if fresh and not in_place:
            shutil.rmtree(root, ignore_errors=True)
        elif in_place and not is_bundle(path):  # leave the directory as empty as it was given
            shutil.rmtree(root / final_name, ignore_errors=True)
            (root / f".{POINTER_FILE}.tmp").unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for an instant, in every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _share(staging: Path, root: Path | None) -> None:
    """Give a new generation (and a new bundle's directory) the permissions the umask asks for: temporary
    directories are made 0700 and some writers make files 0600, which would lock out a service account
    that only reads the bundle."""
    mask = _umask()
    for file in staging.iterdir():
        st = file.lstat()
        # only files made for this generation: a carried file is a hard link to earlier generations (or to a
        # copy of the bundle, or owned by another user) and keeps the mode it was published with
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and stat.S_IMODE(st.st_mode) != 0o666 & ~mask:
            os.chmod(file, 0o666 & ~mask)
    os.chmod(staging, 0o777 & ~mask)
    if root is not None:
        os.chmod(root, 0o777 & ~mask)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (copy where the file system cannot link)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _point(root: Path, name: str) -> None:
    tmp = root / f".{POINTER_FILE}.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / POINTER_FILE)
    _fsync(root)


def _remove_leftovers(path: Path) -> None:
    """Delete what crashed writers left (staging directories, half-built bundles); needs the writer lock."""
    leftovers = list(path.parent.glob(f".{glob_escape(path.name)}.building-*"))
    if path.is_dir() and is_bundle(path):
        leftovers += [c for c in path.iterdir() if c.name.startswith(".gen-") or c.name.startswith(f".{POINTER_FILE}")]
    for child in leftovers:
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def collect_garbage(path: Path, *, lock: bool = True) -> list[str]:
    """Delete the bundle's old generations that no reader holds; returns their names.

    With ``lock``, this takes the writer lock without waiting and does nothing if a writer holds it.
    """
    path = Path(path).resolve()
    if lock:
        try:
            with writer_lock(path, timeout=0):
                return collect_garbage(path, lock=False)
        except BundleLockedError:
            return []
    if not is_bundle(path):
        return []
    live = current_generation(path).name
    removed = []
    for child in sorted(path.iterdir()):
        if child.name == live or not _GEN.match(child.name) or child.is_symlink():
            continue  # a gen-N link is not ours to empty: its files live elsewhere
        manifest = child / MANIFEST_FILE
        try:
            fd = os.open(manifest, os.O_RDONLY)
        except FileNotFoundError:
            shutil.rmtree(child, ignore_errors=True)  # incomplete: a delete that was cut short
            removed.append(child.name)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a reader still uses it
        try:
            manifest.unlink()  # first, so a reader that locks it after us sees it is going
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
        finally:
            os.close(fd)
    return removed
