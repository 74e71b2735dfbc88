"""A change checks and checksums what it reads and writes, not the whole bundle: the append-only vector file is
checksummed in blocks, a change hashes only its last block and the new ones, and damage anywhere is still seen."""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import make_catalogue

from matching import Matcher, checksums
from matching.bundle import current_generation, read_manifest
from matching.checksums import BlockHasher, block_digests, blocks_digest
from matching.errors import BundleError
from matching.layout import SCORER_CONFIG, SCORER_WEIGHTS, STORE_DB, STORE_DELTA, VECTORS_FILE

BLOCK = 1024  # bytes: the tiny bundle's vector file (40 x 32 floats, 5 KiB) spans several blocks


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksums, "BLOCK_BYTES", BLOCK)


def _build(path: Path, encoder: Any) -> Matcher:
    return Matcher.build(make_catalogue(), path, encoder=encoder, show_progress=False)


def test_block_digests_reuse_equals_a_full_hash(tmp_path: Path, small_blocks: None) -> None:
    file = tmp_path / "f"
    file.write_bytes(bytes(range(256)) * 20)  # 5,120 bytes
    full = block_digests(file, 5000)
    assert len(full) == 5  # four whole blocks and 904 bytes
    assert block_digests(file, 5000, ["x"] * 4) == ["x"] * 4 + full[4:]  # given digests are taken as they are
    assert block_digests(file, 5000, full[:2]) == full
    assert block_digests(file, 5000, ["x"] * 9)[4] == full[4]  # the partial block is always hashed
    assert blocks_digest(full) != blocks_digest(full[:4])


@pytest.mark.parametrize("sizes", [[5120], [1, 1023, 1, 3071, 1024], [2048, 2048, 1024], [300] * 17 + [20], []])
def test_blocks_hashed_as_they_are_written_equal_the_file_s(tmp_path: Path, sizes: list[int]) -> None:
    data = os.urandom(sum(sizes))
    hasher = BlockHasher(BLOCK)
    at = 0
    for size in sizes:  # writes across, up to and exactly on block boundaries
        hasher.write(data[at : at + size])
        at += size
    file = tmp_path / "f"
    file.write_bytes(data)
    assert hasher.digests() == block_digests(file, len(data), block=BLOCK)[: len(data) // BLOCK]
    assert not [t for t in threading.enumerate() if t.name == "matching-hasher"]
    with pytest.raises(RuntimeError, match="finished"):
        hasher.write(b"late")


def test_an_error_in_the_hasher_is_raised_by_digests() -> None:
    hasher = BlockHasher(BLOCK)
    hasher.write(b"fine")
    hasher.write(7)  # type: ignore[arg-type]
    hasher.write(b"after")  # the worker keeps taking writes: the writer never blocks on a dead hasher
    with pytest.raises(TypeError):
        hasher.digests()


def test_a_build_hashes_its_vector_file_as_it_writes_it(
    tmp_path: Path, tiny_encoder: Any, small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    reused: list[tuple[int, int]] = []
    real = checksums.block_digests

    def spying(file: Path, size: int, reuse: Any = (), block: int | None = None) -> list[str]:
        if file.name == VECTORS_FILE:
            reused.append((len(reuse), size // BLOCK))
        return real(file, size, reuse, block)

    monkeypatch.setattr(checksums, "block_digests", spying)
    _build(tmp_path / "b", tiny_encoder)
    live = current_generation(tmp_path / "b")
    manifest = read_manifest(live, verify=True)
    size = manifest.sizes[VECTORS_FILE]
    assert size // BLOCK >= 4
    assert reused[0] == (size // BLOCK, size // BLOCK)  # the build read back its last, partial block only
    assert manifest.blocks[VECTORS_FILE] == real(live / VECTORS_FILE, size)


def test_a_change_reuses_the_full_blocks_and_hashes_the_rest(
    tmp_path: Path, tiny_encoder: Any, small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "b"
    m = _build(path, tiny_encoder)
    before = read_manifest(current_generation(path), verify=True)
    size = before.sizes[VECTORS_FILE]
    assert before.blocks[VECTORS_FILE] == block_digests(current_generation(path) / VECTORS_FILE, size)
    hashed: list[int] = []
    real = checksums.block_digests

    def counting(file: Path, size: int, reuse: Any = (), block: int | None = None) -> list[str]:
        assert block == BLOCK  # the bundle's own block size, kept by the change
        out = real(file, size, reuse, block)
        hashed.append(len(out) - min(len(reuse), size // BLOCK))
        return out

    monkeypatch.setattr(checksums, "block_digests", counting)
    m.add(pd.DataFrame({"id": [1], "title": ["acme teal kettle"]}), show_progress=False)
    by_change = list(hashed)
    live = current_generation(path)
    after = read_manifest(live, verify=True)  # every block checked again from the bytes
    new_size = after.sizes[VECTORS_FILE]
    assert new_size == size + 32 * 4
    assert after.blocks[VECTORS_FILE][: size // BLOCK] == before.blocks[VECTORS_FILE][: size // BLOCK]
    assert after.blocks[VECTORS_FILE] == real(live / VECTORS_FILE, new_size)
    # the change checked the live file's last block and wrote the new manifest: never the whole file
    assert by_change == [1, new_size // BLOCK - size // BLOCK + 1]


def test_damage_is_refused_or_still_seen_after_a_change(tmp_path: Path, tiny_encoder: Any, small_blocks: None) -> None:
    path = tmp_path / "b"
    m = _build(path, tiny_encoder)
    live = current_generation(path)
    vectors = live / VECTORS_FILE
    data = bytearray(vectors.read_bytes())
    data[10] ^= 0xFF  # a whole, early block: carried with its digest by the change, so the damage stays seen
    vectors.write_bytes(bytes(data))
    m.add(pd.DataFrame({"id": [1], "title": ["acme teal kettle"]}), show_progress=False)
    with pytest.raises(BundleError, match=r"vectors\.f32.*damaged"):
        read_manifest(current_generation(path), verify=True)
    with pytest.raises(BundleError, match=r"vectors\.f32.*damaged"):
        m.compact(show_progress=False)  # copies every row: checks the whole file first
    # the last block is hashed again by a change: damage there is refused before anything is written
    live = current_generation(path)
    data = bytearray((live / VECTORS_FILE).read_bytes())
    data[10] ^= 0xFF
    size = read_manifest(live, verify=False).sizes[VECTORS_FILE]
    data[size - 1] ^= 0xFF
    (live / VECTORS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vectors\.f32.*damaged"):
        m.add(pd.DataFrame({"id": [2], "title": ["acme red kettle"]}), show_progress=False)
    assert current_generation(path) == live
    data[size - 1] ^= 0xFF
    (live / VECTORS_FILE).write_bytes(bytes(data))
    delta = live / STORE_DELTA  # a file the change rewrites (the delta it copies) is checked whole
    _flip(delta, at=len(delta.read_bytes()) - 1)
    with pytest.raises(BundleError, match=r"delta\.sqlite.*damaged"):
        m.remove([1])
    assert current_generation(path) == live
    _flip(delta, at=len(delta.read_bytes()) - 1)
    _flip(live / STORE_DB, at=len((live / STORE_DB).read_bytes()) - 1)  # a base file: carried with its digest
    m.remove([1])
    with pytest.raises(BundleError, match=r"store\.sqlite.*damaged"):
        read_manifest(current_generation(path), verify=True)


def _flip(file: Path, at: int = 10) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


def _add(m: Matcher) -> None:
    m.add(pd.DataFrame({"id": [900], "title": ["acme teal kettle"]}), show_progress=False)


@pytest.mark.parametrize("how", ["hard-linked copy of the bundle", "no hard links"])
def test_a_vector_file_copied_into_the_change_is_checked_whole(
    tmp_path: Path, tiny_encoder: Any, small_blocks: None, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    path = tmp_path / "a"
    _build(path, tiny_encoder).close()
    if how == "no hard links":
        monkeypatch.setattr(os, "link", _no_link)
    else:  # `cp -al`: the change takes its own copy of the shared vector file
        path = tmp_path / "b"
        shutil.copytree(tmp_path / "a", path, copy_function=os.link)
    live = current_generation(path)
    _flip(live / VECTORS_FILE)  # an early, whole block: hashed anew in the copy
    m = Matcher.load(path, encoder=tiny_encoder, verify=False)
    with pytest.raises(BundleError, match=r"vectors\.f32.*damaged"):
        _add(m)
    assert current_generation(path) == live


def _no_link(*args: Any, **kwargs: Any) -> None:
    raise OSError(1, "no hard links here")


@pytest.mark.parametrize("name", [SCORER_WEIGHTS, SCORER_CONFIG])
def test_a_carried_file_that_is_hashed_anew_is_checked_first(tmp_path: Path, tiny_encoder: Any, name: str) -> None:
    path = tmp_path / "a"
    m = _build(path, tiny_encoder)
    live = current_generation(path)
    with (live / name).open("ab") as fh:  # another size: its digest cannot be carried
        fh.write(b"\0garbage")
    for change in (_add, lambda m: m.compact(show_progress=False)):
        with pytest.raises(BundleError, match=rf"{re.escape(name)}.*damaged"):
            change(m)
        assert current_generation(path) == live


def test_a_copy_checks_its_source_whole(tmp_path: Path, tiny_encoder: Any, small_blocks: None) -> None:
    path = tmp_path / "a"
    m = _build(path, tiny_encoder)
    _flip(current_generation(path) / VECTORS_FILE)
    _add(m)  # carries the damaged block with its digest; the matcher now serves that generation unverified
    with pytest.raises(BundleError, match=r"vectors\.f32.*damaged"):
        m.copy(tmp_path / "c", show_progress=False)
    assert not (tmp_path / "c").exists()


def test_compaction_and_a_partial_copy_write_their_vectors_anew(
    tmp_path: Path, tiny_encoder: Any, small_blocks: None
) -> None:
    """Compaction after an early row is removed, and a copy of the first rows, write a vector file whose blocks
    differ from the live one's from the first block on: that is no damage (both were refused as such before)."""
    path = tmp_path / "b"
    m = _build(path, tiny_encoder)
    assert read_manifest(current_generation(path)).sizes[VECTORS_FILE] > 3 * BLOCK
    first = m.snapshot.store.get([0])[0].external_id
    m.remove([m.snapshot.store.external_id(first)])
    m.compact(show_progress=False)
    live = current_generation(path)
    compacted = read_manifest(live, verify=True)
    assert compacted.blocks[VECTORS_FILE] == block_digests(live / VECTORS_FILE, compacted.sizes[VECTORS_FILE])
    assert len(m) == len(make_catalogue()) - 1
    copy = m.copy(tmp_path / "c", limit=20, show_progress=False)
    assert len(copy) == 20
    copied_gen = current_generation(tmp_path / "c")
    copied = read_manifest(copied_gen, verify=True)
    assert copied.sizes[VECTORS_FILE] == 20 * 32 * 4
    assert copied.blocks[VECTORS_FILE] == block_digests(copied_gen / VECTORS_FILE, copied.sizes[VECTORS_FILE])
    assert first not in {r.external_id for r in copy.snapshot.store.get(copy.snapshot.store.live_ids().tolist())}
