"""Issue #14 classes fixed so far: generation names past six digits, links and folders that only look like
bundles, permissions from the umask, CURRENT files that are not text."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from matching import BundleError, Matcher
from matching.bundle import current_generation, is_bundle
from tests.conftest import make_catalogue


def one_row(i: int) -> pd.DataFrame:
    return pd.DataFrame([{"id": 90_000 + i, "title": f"hardening probe {i}", "brand": "Acme", "price": 1.0}])


def test_generations_go_past_gen_999999(own_bundle: Any, tiny_encoder: Any) -> None:
    path = own_bundle.path
    own_bundle.close()
    (path / "gen-000001").rename(path / "gen-999999")
    (path / "CURRENT").write_text("gen-999999\n", encoding="utf-8")
    with Matcher.load(path, encoder=tiny_encoder) as m:
        assert m.generation == "gen-999999"
        assert m.add(one_row(1), show_progress=False).generation == "gen-1000000"
        assert m.add(one_row(2), show_progress=False).generation == "gen-1000001"
    with Matcher.load(path, encoder=tiny_encoder) as again:
        assert again.generation == "gen-1000001"
        assert len(again) == 42
        assert again.search("hardening probe 2", 1, retrieval="lexical")[0].id == 90_002
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("gen-")) == ["gen-1000001"]


def test_a_folder_with_a_file_named_current_is_not_a_bundle(tmp_path: Path, tiny_encoder: Any) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "CURRENT").write_text("what I am working on\n", encoding="utf-8")
    assert not is_bundle(folder)
    with pytest.raises(BundleError, match="exists and is not a bundle"):
        Matcher.build(make_catalogue(), folder, encoder=tiny_encoder, overwrite=True, show_progress=False)
    assert (folder / "CURRENT").read_text(encoding="utf-8") == "what I am working on\n"


def test_current_that_is_not_text_is_a_clear_error(own_bundle: Any) -> None:
    path = own_bundle.path
    own_bundle.close()
    (path / "CURRENT").write_bytes(b"gen-\xff\xfe01\n")
    with pytest.raises(BundleError, match=r"cannot read .*CURRENT"):
        current_generation(path)
    with pytest.raises(BundleError):
        Matcher.load(path)


def test_garbage_collection_does_not_follow_a_generation_link(own_bundle: Any, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text("{}", encoding="utf-8")
    (elsewhere / "precious.txt").write_text("keep me", encoding="utf-8")
    os.symlink(elsewhere, own_bundle.path / "gen-000000")
    own_bundle.add(one_row(1), show_progress=False)  # a write collects old generations
    own_bundle.add(one_row(2), show_progress=False)
    assert (elsewhere / "precious.txt").read_text(encoding="utf-8") == "keep me"
    assert (elsewhere / "manifest.json").exists()


def test_a_live_generation_link_is_refused(own_bundle: Any, tmp_path: Path) -> None:
    path = own_bundle.path
    gen = current_generation(path)
    own_bundle.close()
    moved = tmp_path / "moved"
    gen.rename(moved)
    os.symlink(moved, gen)
    with pytest.raises(BundleError, match="not a complete generation"):
        current_generation(path)


@pytest.mark.parametrize(
    ("umask", "dirs", "files"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)]
)
def test_bundle_permissions_follow_the_umask(
    tmp_path: Path, tiny_encoder: Any, umask: int, dirs: int, files: int
) -> None:
    before = os.umask(umask)
    try:
        with Matcher.build(make_catalogue(), tmp_path / "b", encoder=tiny_encoder, show_progress=False) as m:
            m.add(one_row(1), show_progress=False)
            gen = current_generation(m.path)
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == dirs
    assert stat.S_IMODE(gen.stat().st_mode) == dirs
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in gen.iterdir()}
    assert modes == dict.fromkeys(modes, files), modes  # the scorer and BM25 weights included


def test_a_huge_k_or_candidates_is_bounded_by_the_catalogue(built_bundle: Any) -> None:
    import tracemalloc

    tracemalloc.start()
    hits = built_bundle.search("red shoes", k=10**9, candidates=10**12, where={"price": {">": 0}})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(hits) == 40
    assert peak < 50 * 2**20  # was ~7.5 GB for k=10**9 before the bound
    assert [h.id for h in built_bundle.search("red shoes", k=10**9)] == [
        h.id for h in built_bundle.search("red shoes", k=40)
    ]
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(Exception, match="k must be a whole number"):
            built_bundle.search("red shoes", k=bad)
