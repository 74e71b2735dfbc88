"""Typed errors for inputs that used to escape as raw exceptions."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from matching import ConfigError, IndexConfig, InputFileError, Matcher
from matching.ingest import CatalogueReader
from matching.pairs import score_file
from matching.training.loop import read_pairs
from matching.training.scorer import TrainConfig


def test_untrainable_ivf_fails_as_config_error_and_writes_nothing(tmp_path: Path, tiny_encoder: Any) -> None:
    frame = pd.DataFrame({"id": [1, 2, 3], "title": ["red shoe", "blue hat", "green sock"]})
    with pytest.raises(ConfigError, match="IVF64"):
        Matcher.build(frame, tmp_path / "b", encoder=tiny_encoder, index_config=IndexConfig(factory="IVF64,Flat"))
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_bad_factory_is_refused_before_encoding(tmp_path: Path, tiny_encoder: Any) -> None:
    frame = pd.DataFrame({"id": [1], "title": [""]})  # would fail as a bad row if encoding had started
    with pytest.raises(ConfigError, match="factory"):
        Matcher.build(frame, tmp_path / "b", encoder=tiny_encoder, index_config=IndexConfig(factory="Nope"))


def test_unknown_encoding_name(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("id,title\n1,red shoe\n")
    with pytest.raises(InputFileError, match="unknown text encoding 'utf-99'"):
        list(CatalogueReader(path, encoding="utf-99"))


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "c.csv.gz"
    rows = "".join(f"{i},shoe number {i * 7919 % 10007}\n" for i in range(5000))
    path.write_bytes(gzip.compress(("id,title\n" + rows).encode())[:2000])
    with pytest.raises(InputFileError, match="damaged or truncated"):
        list(CatalogueReader(path))


def test_pairs_file_in_latin1_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes("query,title,label\ncaf\xe9,tea,1\n".encode("latin-1"))
    with pytest.raises(InputFileError, match="not valid utf-8"):
        read_pairs(path, TrainConfig())


def test_score_file_refuses_zip_and_keeps_header_only_input(tmp_path: Path, built_bundle: Any) -> None:
    src = tmp_path / "pairs.csv"
    src.write_text("query,title,note\n")
    with pytest.raises(InputFileError, match="archive"):
        score_file(built_bundle.snapshot, src, tmp_path / "out.csv.zip", show_progress=False)
    out = tmp_path / "out.csv"
    assert score_file(built_bundle.snapshot, src, out, show_progress=False) == 0
    assert out.read_text().splitlines() == ["query,title,note,score,cosine"]
