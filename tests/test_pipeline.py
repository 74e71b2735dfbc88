"""The encode loop's host side: batch plan, padding, the worker thread ahead of a (stand-in) slow device."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from matching import pipeline
from matching.config import EncoderConfig
from matching.encoder import Encoder

TEXTS = [f"item {i} " + "red running shoes " * (i % 7) for i in range(60)]


def test_batches_cover_every_text_once_longest_first_within_the_token_budget() -> None:
    lengths = np.random.default_rng(0).integers(1, 90, size=500)
    batches = list(pipeline.batch_rows(lengths, batch_size=8))
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    firsts = [int(lengths[b[0]]) for b in batches]
    assert firsts == sorted(firsts, reverse=True)
    for b in batches:
        assert list(lengths[b]) == sorted(lengths[b], reverse=True)
        want = min(max(8, 8 * pipeline.TOKENS_PER_ROW // int(lengths[b[0]])), 8 * pipeline.MAX_ROWS_FACTOR)
        assert len(b) == want or b is batches[-1]


def test_a_padded_width_per_batch_with_a_multiple() -> None:
    lengths = np.array([3, 17, 16, 33, 20, 1])
    batches = list(pipeline.batch_rows(lengths, batch_size=64, pad_multiple=16))
    widths = [{-(-int(n) // 16) for n in lengths[b]} for b in batches]
    assert all(len(w) == 1 for w in widths)
    assert [b.tolist() for b in batches] == [[3], [4, 1], [2, 0, 5]]


def test_padding_by_hand() -> None:
    ids, mask = pipeline.padded([[5, 6, 7], [8]], pad_id=0, left=False, multiple=4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    ids, mask = pipeline.padded([[5, 6, 7], [8]], pad_id=9, left=True, multiple=4, limit=3)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]]  # never wider than the limit
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_prefetched_yields_in_order_and_raises_the_workers_error() -> None:
    assert list(pipeline.prefetched(lambda: iter(range(50)), depth=2)) == list(range(50))

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("bad row 7")

    items = pipeline.prefetched(failing)
    assert next(items) == 1
    with pytest.raises(ValueError, match="bad row 7"):
        next(items)


def test_a_caller_that_stops_early_stops_the_worker() -> None:
    made = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            made.append(i)
            yield i
            i += 1

    before = threading.active_count()
    items = pipeline.prefetched(endless, depth=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()  # joins the worker
    assert threading.active_count() == before
    assert len(made) <= 3 + 2 + 1  # at most the queue's depth ahead, plus the one it was putting


@pytest.fixture
def encoder(tiny_model_dir: Path) -> Encoder:
    return Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), preset="exact"))


def test_pipelined_vectors_equal_the_serial_ones(encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    serial = encoder.encode(TEXTS, batch_size=4)
    monkeypatch.setattr(pipeline, "CHUNK_TEXTS", 7)  # several chunks, each sorted on its own
    encoder.pipelined = True
    ahead = encoder.encode(TEXTS, batch_size=4)
    np.testing.assert_allclose(ahead, serial, atol=1e-6, rtol=0)
    queries = encoder.encode_queries(TEXTS[:9])
    encoder.pipelined = False
    np.testing.assert_array_equal(queries, encoder.encode_queries(TEXTS[:9]))


def test_device_results_come_back_in_groups(encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    serial = encoder.encode(TEXTS, batch_size=4)
    monkeypatch.setattr(pipeline, "FLUSH_ROWS", 10)
    out = np.zeros_like(serial)
    results = pipeline.Results(out, on_host=False)
    for rows in np.array_split(np.arange(len(TEXTS))[::-1], 9):
        results.add(rows, torch.from_numpy(serial[rows]))
    results.flush()
    np.testing.assert_array_equal(out, serial)


def test_the_host_works_while_a_slow_device_runs(encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in device that takes 40 ms a batch and host padding that takes 40 ms: pipelined, the padding of
    the next batch runs while the device has the previous one."""
    spans: dict[str, list[tuple[float, float]]] = {"host": [], "device": []}
    real_padded = pipeline.padded
    real_embed = encoder.embed

    def slow_padded(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        time.sleep(0.04)
        out = real_padded(*args, **kwargs)
        spans["host"].append((start, time.perf_counter()))
        return out

    def slow_device(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(0.04)
        out = real_embed(batch)
        spans["device"].append((start, time.perf_counter()))
        return out

    monkeypatch.setattr(pipeline, "padded", slow_padded)
    monkeypatch.setattr(encoder, "embed", slow_device)
    want = encoder.encode(TEXTS, batch_size=8)  # serial: host and device take turns
    serial = dict(spans)
    assert not any(h0 < d1 and d0 < h1 for h0, h1 in serial["host"] for d0, d1 in serial["device"])
    spans.update(host=[], device=[])
    encoder.pipelined = True
    got = encoder.encode(TEXTS, batch_size=8)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    overlaps = sum(h0 < d1 and d0 < h1 for h0, h1 in spans["host"] for d0, d1 in spans["device"])
    assert overlaps >= len(spans["device"]) - 2  # every batch but the ends padded while the device ran another


def test_the_backend_token_ids_equal_the_tokenizers(tiny_model_dir: Path, tmp_path: Path) -> None:
    from conftest import make_tiny_bert

    chinese = "红色跑鞋 蓝色 耳机"
    zh = make_tiny_bert(tmp_path / "zh", extra=sorted(set(chinese) - {" "}))
    texts = [*TEXTS, "[SEP] inside [CLS] a title", "", "  ", chinese, "UPPER case Café", "word " * 300]
    for directory in (tiny_model_dir, zh):
        tokenizer = Encoder.from_pretrained(EncoderConfig(model=str(directory))).tokenizer
        for limit in (128, 5):
            want = tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
            assert pipeline.token_ids(tokenizer, limit)(texts) == want


def test_a_tokenizer_without_a_rust_backend_is_called_as_it_is(encoder: Encoder) -> None:
    class Slow:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __call__(self, texts: list[str], **kwargs: Any) -> Any:
            return self.inner(texts, **kwargs)

    tokenizer = encoder.tokenizer
    texts = TEXTS[:5]
    assert pipeline.token_ids(Slow(tokenizer), 6)(texts) == tokenizer(texts, truncation=True, max_length=6)["input_ids"]


def test_a_deadline_mid_encode_stops_the_worker_at_once(encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    from matching import deadline
    from matching.errors import MatchingError

    real_embed = encoder.embed

    def slow(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        time.sleep(0.05)
        return real_embed(batch)

    monkeypatch.setattr(encoder, "embed", slow)
    monkeypatch.setattr(pipeline, "CHUNK_TEXTS", 5)
    encoder.pipelined = True
    kept: list[BaseException] = []
    try:
        with deadline.within(0.08):
            encoder.encode(TEXTS, batch_size=1)
    except MatchingError as exc:  # kept, with its traceback and so the frames of encode
        kept.append(exc)
    assert kept
    assert not [t for t in threading.enumerate() if t.name == "matching-encode-host"]


def test_token_ids_follow_the_tokenizers_settings(tiny_model_dir: Path) -> None:
    tokenizer = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir))).tokenizer
    texts = ["[SEP] inside [CLS] a title", "word " * 40, "newtok here"]

    def check(limit: int) -> None:
        assert (
            pipeline.token_ids(tokenizer, limit)(texts)
            == tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        )

    for limit in (1, 5, 128):
        check(limit)
    assert pipeline.token_ids(tokenizer, 5) is pipeline.token_ids(tokenizer, 5)  # one copy per tokenizer
    tokenizer.split_special_tokens = True
    check(128)
    tokenizer.truncation_side = "left"
    check(5)
    tokenizer.add_tokens(["newtok"])
    check(128)


def test_a_tokenizer_that_cannot_be_copied_is_called_as_it_is(encoder: Encoder) -> None:
    class Uncopyable:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.backend_tokenizer = self

        def to_str(self) -> str:
            raise Exception("Custom PreTokenizer cannot be serialized")  # as tokenizers says it

        def __call__(self, texts: list[str], **kwargs: Any) -> Any:
            return self.inner(texts, **kwargs)

    tokenizer = encoder.tokenizer
    texts = TEXTS[:5]
    want = tokenizer(texts, truncation=True, max_length=6)["input_ids"]
    assert pipeline.token_ids(Uncopyable(tokenizer), 6)(texts) == want


def test_any_sequence_of_texts(encoder: Encoder) -> None:
    import collections

    want = encoder.encode(TEXTS[:9])
    np.testing.assert_array_equal(encoder.encode(collections.deque(TEXTS[:9])), want)
    np.testing.assert_array_equal(encoder.encode(tuple(TEXTS[:9])), want)
