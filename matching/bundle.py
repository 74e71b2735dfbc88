"""Bundle directory layout, manifest, checksums and the atomic swap of generations.

A bundle is a directory holding numbered generations and a ``CURRENT`` file naming the live one::

    indexes/products/
        CURRENT            -> "gen-000002"
        gen-000002/        manifest.json + each component's files

A new generation is written beside the live one, flushed to disk, and published by atomically
replacing ``CURRENT``; a crash before that leaves the old generation live and untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matching.errors import BundleError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
POINTER_FILE = "CURRENT"
_GEN = re.compile(r"gen-(\d{6})\Z")


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
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION
    files: dict[str, str] = field(default_factory=dict)

    @property
    def factory(self) -> str:
        return str(self.index.get("factory", ""))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_bundle(path: Path) -> bool:
    return (path / POINTER_FILE).is_file()


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
    name = pointer.read_text(encoding="utf-8").strip()
    gen = path / name
    if not _GEN.match(name) or not (gen / MANIFEST_FILE).is_file():
        raise BundleError(f"bundle {str(path)!r} points to {name!r}, which is not a complete generation")
    return gen


def read_manifest(generation: Path, *, verify: bool = True) -> Manifest:
    """Read a generation's manifest; with ``verify``, check every file against its checksum."""
    try:
        manifest = Manifest.from_dict(json.loads((generation / MANIFEST_FILE).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise BundleError(f"cannot read {str(generation / MANIFEST_FILE)!r}: {exc}") from None
    if manifest.format_version > FORMAT_VERSION:
        raise BundleError(
            f"bundle format {manifest.format_version} is newer than this library reads ({FORMAT_VERSION}); "
            "upgrade matching"
        )
    if verify:
        for name, digest in manifest.files.items():
            file = generation / name
            if not file.is_file():
                raise BundleError(f"bundle file {str(file)!r} is missing")
            if sha256_file(file) != digest:
                raise BundleError(f"bundle file {str(file)!r} is damaged: its checksum does not match the manifest")
    return manifest


def write_manifest(generation: Path, manifest: Manifest) -> None:
    """Checksum every file in ``generation`` into ``manifest`` and write it (last)."""
    manifest.files = {
        p.name: sha256_file(p) for p in sorted(generation.iterdir()) if p.is_file() and p.name != MANIFEST_FILE
    }
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    (generation / MANIFEST_FILE).write_text(text, encoding="utf-8")


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
    if any(path.iterdir()):
        raise BundleError(f"{str(path)!r} exists and is not a bundle; choose an empty or new directory")


@contextlib.contextmanager
def new_generation(path: Path, *, overwrite: bool = False, carry: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a directory to write a generation into; publish it atomically on success.

    ``carry`` names files of the live generation to bring along unchanged (hard-linked, or copied where
    links are not possible) so a change that touches one component (say, a retrained scorer) writes only
    that component. On any exception the partial generation is deleted and whatever was live stays live.
    """
    path = Path(path)
    if carry:
        live = current_generation(path)
    else:
        check_target(path, overwrite=overwrite)
    fresh = not is_bundle(path)
    if fresh:
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
        for name in carry:
            try:
                os.link(live / name, staging / name)
            except OSError:
                shutil.copy2(live / name, staging / name)
        yield staging
        if not (staging / MANIFEST_FILE).is_file():
            raise BundleError("internal error: a generation was finished without a manifest")
        for file in staging.iterdir():
            _fsync(file)
        staging.rename(root / final_name)
        _fsync(root)
        _point(root, final_name)
        if fresh:
            if path.exists():
                path.rmdir()  # an empty directory the user made for us
            root.rename(path)
            _fsync(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if fresh:
            shutil.rmtree(root, ignore_errors=True)
        raise
    _remove_stale(path, keep=final_name)


def _point(root: Path, name: str) -> None:
    tmp = root / f".{POINTER_FILE}.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / POINTER_FILE)
    _fsync(root)


def _remove_stale(path: Path, *, keep: str) -> None:
    """Delete generations and staging leftovers other than ``keep`` (open readers keep their files)."""
    for child in path.iterdir():
        if child.name == keep or child.name == POINTER_FILE:
            continue
        if _GEN.match(child.name) or child.name.startswith("."):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
