"""The BM25 index a build makes beside its encoding (``LexicalStream``) is the one a build over the finished store
made (``LexicalIndex.build`` over its ``(row_id, title)`` pairs): the same files, byte for byte; and a failure in
its worker or the build leaves no thread behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_catalogue

from matching import Matcher, analysis, generation
from matching.analysis import Analyzer
from matching.bundle import current_generation
from matching.errors import BadRowError, ConfigError
from matching.lexical import LexicalIndex, streamed
from matching.lexical.streamed import LexicalStream
from matching.store import StoreWriter

ENGLISH = ["red running shoes", "Blue Shoes for running", "a kettle", "steel kettle 2 l", "shoes, shoes, shoes"]
CHINESE = ["红色跑步鞋", "蓝色 跑步 鞋子", "不锈钢 水壶", "水壶 2 升", "鞋 鞋 鞋"]


def _files(index: LexicalIndex, directory: Path) -> dict[str, bytes]:
    index.save(directory)
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _streamed(chunks: list[tuple[np.ndarray, list[str]]], analyzer: Analyzer, rows: int) -> LexicalIndex:
    stream = LexicalStream(analyzer)
    for ids, titles in chunks:
        stream.add(ids, titles)
    return stream.finish(rows)


@pytest.mark.parametrize("flush", [1, 3, 1000])
@pytest.mark.parametrize("analyzer", [Analyzer.AUTO, Analyzer.ENGLISH, Analyzer.CJK])
def test_the_stream_writes_the_index_a_build_over_the_store_writes(
    analyzer: Analyzer, flush: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streamed, "FLUSH_TITLES", flush)
    titles = [f"{(ENGLISH + CHINESE)[i % 10]} {i % 7}" for i in range(40)]
    chunks, start = [], 0
    for size in (3, 1, 11, 25):  # uneven chunks, flushed mid-chunk and across chunks
        chunks.append((np.arange(start, start + size), titles[start : start + size]))
        start += size
    rows = start + 4  # rows past the last title are dead, as the store's rows are
    expected = LexicalIndex.build(list(enumerate(titles[:start])), analyzer, rows=rows)
    got = _streamed(chunks, analyzer, rows)
    assert got.analyzer == expected.analyzer
    assert _files(got, tmp_path / "got") == _files(expected, tmp_path / "expected")
    queries = ["running shoes", "水壶"]
    assert got.search(queries, 5)[1].tolist() == expected.search(queries, 5)[1].tolist()


def test_auto_is_resolved_on_the_first_titles_as_a_build_resolves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # resolve_analyzer reads the first RESOLVE_SAMPLE titles: English ones, then Chinese, resolve to English; the
    # stream's first batch waits for them, whatever its batch size
    monkeypatch.setattr(analysis, "RESOLVE_SAMPLE", 4)
    monkeypatch.setattr(streamed, "FLUSH_TITLES", 1)
    titles = ENGLISH[:4] + CHINESE * 5
    expected = LexicalIndex.build(titles, Analyzer.AUTO)
    got = _streamed([(np.arange(2), titles[:2]), (np.arange(2, len(titles)), titles[2:])], Analyzer.AUTO, len(titles))
    assert got.analyzer == expected.analyzer == Analyzer.ENGLISH
    assert _files(got, tmp_path / "got") == _files(expected, tmp_path / "expected")


def test_nothing_added_is_an_empty_index_of_dead_rows() -> None:
    index = LexicalStream(Analyzer.AUTO).finish(3)
    assert (index.rows, index.count, index.analyzer) == (3, 0, Analyzer.ENGLISH)


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name == "matching-lexical"}


def test_a_title_that_is_not_a_string_is_the_build_error_naming_its_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streamed, "FLUSH_TITLES", 2)
    stream = LexicalStream(Analyzer.ENGLISH)
    stream.add(np.arange(2), ["fine", 7])  # type: ignore[list-item]

    def keep_building() -> None:
        for _ in range(100):  # the worker's error reaches the next add (or finish)
            stream.add(np.arange(2), ["a", "b"])
        stream.finish(2)

    with pytest.raises(BadRowError, match="row 1: title 7"):
        keep_building()
    stream.close()
    assert not _threads()


def test_an_error_in_the_last_batch_is_raised_by_finish() -> None:
    stream = LexicalStream(Analyzer.ENGLISH)
    stream.add(np.arange(2), ["fine", None])  # type: ignore[list-item]
    with pytest.raises(BadRowError, match="row 1"):
        stream.finish(2)
    assert not _threads()


def test_close_abandons_what_is_queued_and_ends_the_worker() -> None:
    stream = LexicalStream(Analyzer.ENGLISH)
    for start in range(0, 200, 10):
        stream.add(np.arange(start, start + 10), ["title"] * 10)
    stream.close()
    stream.close()  # twice is fine (a failed build's cleanup)
    assert not _threads()
    with pytest.raises(RuntimeError, match="finished"):
        stream.add(np.arange(200, 201), ["late"])


def test_an_unknown_analyzer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown analyzer 'klingon'"):
        LexicalStream("klingon")
    assert not _threads()


def test_rows_below_the_last_row_id_are_refused() -> None:
    stream = LexicalStream(Analyzer.ENGLISH)
    stream.add(np.arange(5), ["a"] * 5)
    with pytest.raises(ValueError, match="below the last row id 4"):
        stream.finish(3)


def test_flush_indexes_what_was_added_before_finish(tmp_path: Path) -> None:
    titles = [f"{ENGLISH[i % 5]} {i}" for i in range(30)]
    stream = LexicalStream(Analyzer.AUTO)
    ids = np.arange(30)
    stream.add(ids, titles)
    ids[:] = 0  # the stream keeps its own copy of the ids it was handed
    stream.flush()
    for _ in range(500):  # the worker indexes them now, not at finish
        if stream._index is not None:
            break
        time.sleep(0.01)
    assert stream._index is not None
    expected = LexicalIndex.build(titles, Analyzer.AUTO, rows=32)
    assert _files(stream.finish(32), tmp_path / "got") == _files(expected, tmp_path / "expected")


def test_finish_after_close_is_refused() -> None:
    stream = LexicalStream(Analyzer.ENGLISH)
    stream.add(np.arange(2), ["a", "b"])
    stream.close()
    with pytest.raises(RuntimeError, match="closed"):
        stream.finish(2)


def _worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in ("matching-lexical", "matching-hasher")]


def test_a_build_writes_the_bm25_index_of_its_store(tmp_path: Path, tiny_encoder: Any) -> None:
    Matcher.build(make_catalogue(), tmp_path / "b", encoder=tiny_encoder, show_progress=False, chunksize=7)
    live = current_generation(tmp_path / "b")
    from_store = generation.lexical_from_store(live, Analyzer.AUTO)
    from_store.save(tmp_path / "from-store")
    for name in ("lexical.json", "lexical.safetensors"):
        assert (live / name).read_bytes() == (tmp_path / "from-store" / name).read_bytes()
    assert not _worker_threads()


@pytest.mark.parametrize("where", ["encoding", "index", "finish"])
def test_a_failed_build_publishes_nothing_and_leaves_no_thread(
    tmp_path: Path, tiny_encoder: Any, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    calls: list[int] = []
    real_encode = tiny_encoder.encode_titles

    def failing_encode(titles: Any, **kwargs: Any) -> Any:
        calls.append(len(titles))
        if len(calls) == 3:
            raise RuntimeError("encoder failed")
        return real_encode(titles, **kwargs)

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{where} failed")

    if where == "encoding":
        monkeypatch.setattr(tiny_encoder, "encode_titles", failing_encode)
    elif where == "index":
        monkeypatch.setattr(generation, "index_from_store", failing)
    else:
        monkeypatch.setattr(StoreWriter, "finish", failing)
    with pytest.raises(RuntimeError, match="failed"):
        Matcher.build(make_catalogue(), tmp_path / "b", encoder=tiny_encoder, show_progress=False, chunksize=7)
    assert not _worker_threads()
    assert not (tmp_path / "b" / "CURRENT").exists()
