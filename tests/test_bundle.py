"""Bundles written by earlier versions keep loading and answering identically (tests/data/bundle-v0.1 was written
by the library before the package was reshaped into search/generation/changes, with a removed title in it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from matching import Matcher
from matching.bundle import FORMAT_VERSION, current_generation, read_manifest
from matching.layout import STORE_DELTA, VECTORS_FILE

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def old_bundle(tmp_path: Path) -> Path:
    path = tmp_path / "bundle-v0.1"
    shutil.copytree(DATA / "bundle-v0.1", path)
    return path


def test_a_bundle_of_the_old_layout_loads_and_answers_identically(old_bundle: Path, tiny_encoder: Any) -> None:
    expected = json.loads((DATA / "bundle-v0.1.expected.json").read_text(encoding="utf-8"))
    assert tiny_encoder.fingerprint == expected["fingerprint"]  # the tiny BERT is rebuilt from a fixed seed
    with Matcher.load(old_bundle, encoder=tiny_encoder) as m:  # verify=True: every checksum still holds
        assert len(m) == expected["count"]
        queries = list(expected["search"])
        for q, hits in zip(queries, m.search_batch(queries, k=5), strict=True):
            assert [[h.id, h.title] for h in hits] == [[i, t] for i, t, _ in expected["search"][q]]
            assert [h.score for h in hits] == pytest.approx([s for _, _, s in expected["search"][q]], abs=1e-6)
        filtered = m.search("shoes", k=3, where={"brand": "Acme"})
        assert [[h.id, pytest.approx(h.score, abs=1e-6)] for h in filtered] == expected["filtered"]


def test_an_old_bundle_takes_changes(old_bundle: Path, tiny_encoder: Any) -> None:
    with Matcher.load(old_bundle, encoder=tiny_encoder) as m:
        before = len(m)
        m.add(pd.DataFrame({"id": [1], "title": ["Acme purple yoga mat"]}), show_progress=False)
        assert len(m) == before + 1
        assert m.search("Acme purple yoga mat", k=1)[0].id == 1
    with Matcher.load(old_bundle, encoder=tiny_encoder) as again:
        assert len(again) == before + 1
    manifest = read_manifest(current_generation(old_bundle))  # written now: in this version's format, with blocks
    assert manifest.format_version == (FORMAT_VERSION if STORE_DELTA in manifest.files else 2)
    assert list(manifest.blocks) == [VECTORS_FILE]
