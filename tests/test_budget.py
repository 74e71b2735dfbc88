"""Work per read is bounded (issue #22): a token budget (413), a deadline (503 queued, 504 running, the worker
freed), and a read token (``--read-token-file``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_catalogue

pytest.importorskip("fastapi")
import anyio.to_thread
from fastapi.testclient import TestClient

from matching import DeadlineError, Matcher
from matching.budget import token_floor
from matching.cli.main import main
from matching.config import ServiceConfig
from matching.deadline import check, remaining, within
from matching.errors import ConfigError
from matching.service import app_from_env, create_app
from matching.service.server import ENV_BUNDLE, ENV_READ_TOKEN, ENV_TOKEN

TOKEN = "write-token-0123456789"
READ = "read-token-0123456789ab"
QUERIES = ["red running shoes", "wireless headphones", "red running shoes", "steel water bottle for camping"]


def wait_ready(client: TestClient) -> None:
    end = time.monotonic() + 30
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < end, "the service did not become ready"
        time.sleep(0.05)


def serve(bundle: Path, **config: Any) -> TestClient:
    return TestClient(create_app(bundle, token=TOKEN, config=ServiceConfig(refresh_seconds=0.1, **config)))


def long_text(i: int, words: int = 150) -> str:
    """A distinct text of ``words`` tiny-vocabulary words (one token each), so ``max_length`` cuts it."""
    vocab = [
        "red",
        "blue",
        "green",
        "black",
        "white",
        "shoes",
        "boots",
        "jacket",
        "coat",
        "cable",
        "charger",
        "lamp",
        "desk",
        "chair",
        "mug",
        "cup",
    ]
    return f"{i} " + " ".join(vocab[(i + j) % len(vocab)] for j in range(words))


# -- counting -------------------------------------------------------------------------------------


def test_token_counts_are_the_tokenizers_cut_at_the_limit(tiny_encoder: Any) -> None:
    texts = ["red running shoes", "", "wirelessheadphones", long_text(1, 300)]
    expected = [len(tiny_encoder.tokenizer(t, truncation=True, max_length=128)["input_ids"]) for t in texts]
    assert tiny_encoder.token_limit == tiny_encoder.max_length == 128
    assert expected[:2] == [5, 2]  # [CLS] red running shoes [SEP]; [CLS] [SEP]
    assert expected[3] == 128
    assert tiny_encoder.token_counts(texts).tolist() == expected
    assert tiny_encoder.token_counts([]).tolist() == []


def test_tokens_to_encode_counts_distinct_queries_and_titles_not_in_the_catalogue(
    library: Matcher, tiny_encoder: Any
) -> None:
    counts = dict(zip(QUERIES, tiny_encoder.token_counts(QUERIES).tolist(), strict=True))
    assert library.tokens_to_encode(QUERIES) == sum(counts.values()) == 5 + 4 + 7
    stored = make_catalogue()["title"].tolist()[:3]
    assert library.tokens_to_encode(["red"] * 3, stored) == 3  # stored titles reuse their vectors
    unseen = ["blue desk lamp for the office", "blue desk lamp for the office"]
    assert library.tokens_to_encode(["red", "red"], stored[:2] + unseen) == 3 + 8
    many = [long_text(i) for i in range(200)]  # 128 tokens each
    assert library.tokens_to_encode(many) == 200 * 128
    # past the budget on the floor (151 words a text, at most 128): the 8 or 40 texts that pass it, never tokenised
    assert library.tokens_to_encode(many, stop_above=1000) == 8 * 128
    assert library.tokens_to_encode(many, stop_above=5000) == 40 * 128
    short = [f"{i} red mug" for i in range(200)]  # floor 3 a text, 5 to 7 tokens: counted in slices past 900
    counts = np.cumsum(tiny_encoder.token_counts(short))
    partial = library.tokens_to_encode(short, stop_above=900)
    assert partial > 900
    assert partial in counts[:-1].tolist()  # the sum of the texts counted so far, before the last
    assert library.tokens_to_encode(["half \ud800 a pair"]) == 12  # counted; refused later with its place named


def test_the_floor_never_passes_the_tokenizers_count(tiny_encoder: Any) -> None:
    texts = [
        "red running shoes",
        "\u0301 \u200b \x07 ___ -- !!",  # an accent, a zero-width space, a bell, underscores, punctuation alone
        "北京 usb-c a\u0301b x_y",
        "wirelessheadphones " * 40,
    ]
    floors = [token_floor([t], 128, 10**9) for t in texts]
    assert floors == [3, 0, 4, 40]
    assert all(f <= n - 2 for f, n in zip(floors, tiny_encoder.token_counts(texts).tolist(), strict=True))


# -- the budget over HTTP -------------------------------------------------------------------------


def test_a_search_at_the_budget_passes_and_one_over_is_413_naming_the_numbers(bundle: Path, library: Matcher) -> None:
    budget = library.tokens_to_encode(QUERIES)
    with serve(bundle, max_request_tokens=budget) as client:
        wait_ready(client)
        assert client.post("/search", json={"queries": QUERIES, "k": 3}).status_code == 200
        r = client.post("/search", json={"queries": [*QUERIES, "blue mug"], "k": 3})
        assert r.status_code == 413
        detail = r.json()["detail"]
        assert f"at least {budget + 4} tokens (distinct queries)" in detail
        assert f"at most {budget} a request (max_request_tokens)" in detail
        assert "send fewer or shorter texts" in detail
        assert client.get("/search", params={"q": long_text(0)}).status_code == 413  # 128 tokens > 16


def test_score_counts_queries_and_unseen_titles_against_the_budget(bundle: Path, library: Matcher) -> None:
    stored = make_catalogue()["title"].tolist()
    pairs = [{"query": "red running shoes", "title": t} for t in stored]  # 40 pairs, 5 tokens to encode
    with serve(bundle, max_request_tokens=5) as client:
        wait_ready(client)
        r = client.post("/score", json={"pairs": pairs})
        assert r.status_code == 200
        assert r.json()["scores"] == pytest.approx(
            library.score_pairs(["red running shoes"] * 40, stored).tolist(), abs=1e-5
        )
        r = client.post("/score", json={"pairs": [*pairs, {"query": "red running shoes", "title": "blue mug"}]})
        assert r.status_code == 413
        # 5 for the query, then "blue mug" passes the budget on its floor of 2 words
        assert "at least 7 tokens (distinct queries and titles not in the catalogue); at most 5" in r.json()["detail"]


def test_a_request_of_few_texts_is_not_counted(bundle: Path, library: Matcher, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each distinct text is read up to the token limit (128 here): a request whose texts could not pass the budget
    at the limit each is let through without the tokenizer; one that could is counted, and refused on the count."""
    assert library.token_ceiling(["a", "a", "b"], ["x", "y", "y"]) == 2 * 128 + 2 * 128
    counted: list[int] = []
    real = Matcher.tokens_to_encode

    def counting(self: Matcher, *args: Any, **kwargs: Any) -> int:
        counted.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Matcher, "tokens_to_encode", counting)
    with serve(bundle, max_request_tokens=3 * 128) as client:
        wait_ready(client)
        assert client.post("/search", json={"queries": QUERIES, "k": 3}).status_code == 200
        assert counted == []
        many = [long_text(i) for i in range(4)]
        assert client.post("/search", json={"queries": many, "k": 3}).status_code == 413
        assert counted == [1]


# -- the deadline -----------------------------------------------------------------------------------


def test_check_raises_only_past_the_deadline_and_the_earlier_one_holds() -> None:
    check()  # no deadline: nothing
    assert remaining() is None
    with within(10.0):
        check()
        assert 9.0 < (remaining() or 0) <= 10.0
        with within(0.01):
            time.sleep(0.02)
            with pytest.raises(DeadlineError, match=r"past its deadline of 0\.01 s"):
                check()
        check()  # the outer one holds again
        with within(60.0):
            assert (remaining() or 0) <= 10.0  # the later inner deadline does not extend the outer
    with pytest.raises(ConfigError), within(0):
        pass


class SlowBatches:
    """Wraps an encoder's ``_host_padded`` (one call per batch): sleeps ``pause`` s and records each batch's texts."""

    def __init__(self, encoder: Any, monkeypatch: pytest.MonkeyPatch, pause: float) -> None:
        self.batches: list[int] = []
        original = encoder._host_padded

        def padded(rows: list[list[int]], multiple: int = 1) -> Any:
            self.batches.append(len(rows))
            time.sleep(pause)
            return original(rows, multiple)

        monkeypatch.setattr(encoder, "_host_padded", padded)
        monkeypatch.setattr(encoder, "batch_size", 1)  # texts of 64+ tokens then go one a batch


def test_the_encoder_stops_between_batches_past_the_deadline(
    tiny_encoder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowBatches(tiny_encoder, monkeypatch, 0.2)
    tiny_encoder.encode([long_text(99)])  # the first call at this batch size builds its runner: not timed
    slow.batches.clear()
    with within(1.0), pytest.raises(DeadlineError):
        tiny_encoder.encode([long_text(i) for i in range(40)])
    assert 2 <= len(slow.batches) <= 6  # of 40 (8 s): it stopped ~1 s in (fewer where the forward pass is slow)
    assert set(slow.batches) == {1}


@pytest.mark.parametrize("route", ["search", "score"])
def test_a_read_past_its_deadline_is_504_and_its_thread_stops(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    with serve(bundle, request_seconds=1.0) as client:
        wait_ready(client)
        matcher = client.app.state.service.matcher  # type: ignore[attr-defined]
        slow = SlowBatches(matcher.query_encoder, monkeypatch, 0.2)
        texts = [long_text(i) for i in range(40)]  # 40 batches of 0.2 s: 8 s without a deadline
        if route == "search":
            r = client.post("/search", json={"queries": texts})
        else:
            r = client.post("/score", json={"pairs": [{"query": t, "title": "red mug"} for t in texts]})
        assert r.status_code == 504
        assert "past its deadline of 1 s" in r.json()["detail"]
        seen = len(slow.batches)
        assert 2 <= seen <= 6
        time.sleep(0.3)
        assert len(slow.batches) == seen  # the worker thread stopped: no batch after the answer
        assert client.get("/search", params={"q": "red mug"}).status_code == 200  # and serves the next one
        assert 'matching_requests_total{route="/' + route + '",status="504"} 1' in client.get("/metrics").text


def test_a_read_that_waited_past_its_deadline_for_a_thread_is_503_without_encoding(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the direct path (batching off): a batched GET waits in the batch queue instead (tests/test_batching.py)
    with serve(bundle, request_seconds=1.0, batch_wait_ms=0.0) as client:
        wait_ready(client)

        def one_thread() -> None:
            anyio.to_thread.current_default_thread_limiter().total_tokens = 1

        client.portal.call(one_thread)  # type: ignore[union-attr]
        matcher = client.app.state.service.matcher  # type: ignore[attr-defined]
        slow = SlowBatches(matcher.query_encoder, monkeypatch, 1.5)
        first: dict[str, Any] = {}
        busy = threading.Thread(
            target=lambda: first.update(r=client.post("/search", json={"queries": [long_text(i) for i in range(9)]}))
        )
        busy.start()
        end = time.monotonic() + 10
        while not slow.batches and time.monotonic() < end:  # the first holds the only thread
            time.sleep(0.01)
        # its first batch takes 1.5 s; the check after it stops it and frees the thread: the second waited ~1.5 s
        r = client.get("/search", params={"q": "red mug"})
        busy.join()
        assert first["r"].status_code == 504
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "waited" in r.json()["detail"]
        assert "past its 1 s deadline" in r.json()["detail"]
        assert slow.batches == [1]  # the first's; none for the second


def test_writes_are_not_cut_by_the_read_deadline(bundle: Path, tmp_path: Path, tiny_encoder: Any) -> None:
    path = tmp_path / "writable"
    Matcher.build(make_catalogue(), path, encoder=tiny_encoder, show_progress=False).close()
    with serve(path, request_seconds=0.001) as client:
        wait_ready(client)
        rows = [{"id": 1, "title": "deadline probe"}]
        r = client.post("/add", json={"rows": rows}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert r.json()["added"] == 1


# -- the read token ---------------------------------------------------------------------------------


READS = [
    ("GET", "/search", {"params": {"q": "red mug"}}),
    ("POST", "/search", {"json": {"queries": ["red mug"]}}),
    ("POST", "/score", {"json": {"pairs": [{"query": "red mug", "title": "red mug"}]}}),
    ("GET", "/info", {}),
    ("GET", "/metrics", {}),
]


@pytest.fixture(scope="module")
def guarded(bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(bundle, token=TOKEN, read_token=READ)) as client:
        wait_ready(client)
        yield client


@pytest.mark.parametrize(("method", "route", "kwargs"), READS)
def test_reads_need_the_read_or_the_write_token(
    guarded: TestClient, method: str, route: str, kwargs: dict[str, Any]
) -> None:
    r = guarded.request(method, route, **kwargs)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer <read token>" in r.json()["detail"]
    wrong = guarded.request(method, route, headers={"Authorization": "Bearer not-the-token-0123"}, **kwargs)
    assert wrong.status_code == 403
    for token in (READ, TOKEN):
        assert guarded.request(method, route, headers={"Authorization": f"Bearer {token}"}, **kwargs).status_code == 200


def test_health_ready_and_the_page_stay_open_and_the_read_token_cannot_write(guarded: TestClient) -> None:
    assert guarded.get("/health").status_code == 200
    assert guarded.get("/ready").status_code == 200
    assert "Authorization" in guarded.get("/").text  # the page asks for the token and sends it
    r = guarded.post("/remove", json={"ids": [1000]}, headers={"Authorization": f"Bearer {READ}"})
    assert r.status_code == 403
    info = guarded.get("/info", headers={"Authorization": f"Bearer {READ}"}).json()
    assert info["reads_need_token"] is True
    assert "path" not in info


def test_workers_read_both_token_files_from_the_environment(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, token in (("write", TOKEN), ("read", READ)):
        (tmp_path / name).write_text(token + "\n", encoding="utf-8")
        (tmp_path / name).chmod(0o600)
    monkeypatch.setenv(ENV_BUNDLE, str(bundle))
    monkeypatch.setenv(ENV_TOKEN, str(tmp_path / "write"))
    monkeypatch.setenv(ENV_READ_TOKEN, str(tmp_path / "read"))
    service = app_from_env().state.service
    assert (service.token, service.read_token) == (TOKEN, READ)
    monkeypatch.delenv(ENV_READ_TOKEN)
    assert app_from_env().state.service.read_token is None


def test_serve_passes_the_read_token_file_and_the_bounds(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matching.service

    seen: dict[str, Any] = {}
    monkeypatch.setattr(matching.service, "serve", lambda bundle, **kwargs: seen.update(kwargs))
    args = ["serve", str(bundle), "--read-token-file", str(tmp_path / "read"), "--max-request-tokens", "100"]
    assert main(args) == 0
    assert seen["read_token_file"] == str(tmp_path / "read")
    assert seen["config"] == ServiceConfig(max_request_tokens=100)  # the rest: ServiceConfig's defaults
    assert main(["serve", str(bundle), "--request-seconds", "2.5"]) == 0
    assert seen["read_token_file"] is None
    assert seen["config"] == ServiceConfig(request_seconds=2.5)


# -- the configuration ------------------------------------------------------------------------------


def test_service_config_round_trips_the_budget_and_the_deadline(tmp_path: Path) -> None:
    config = ServiceConfig(max_request_tokens=1000, request_seconds=2.5)
    config.save(tmp_path / "service.json")
    assert ServiceConfig.load(tmp_path / "service.json") == config
    assert ServiceConfig.from_dict({"request_seconds": 3}).request_seconds == 3.0
    assert ServiceConfig().max_request_tokens == 8192
    assert ServiceConfig().request_seconds == 10.0
    for bad in ({"max_request_tokens": 0}, {"request_seconds": -1.0}):
        with pytest.raises(ConfigError, match="must be > 0"):
            ServiceConfig.from_dict(bad)


def test_service_config_refuses_infinities_and_nan() -> None:
    # batch_wait_ms=inf made the batch worker's queue wait raise and the worker die: every later read hung
    for bad in ({"batch_wait_ms": float("inf")}, {"request_seconds": float("nan")}):
        with pytest.raises(ConfigError, match="must be"):
            ServiceConfig.from_dict(bad)


def test_the_floor_counts_words_and_reads_long_punctuation_in_one_pass() -> None:
    assert token_floor(["red shoes", "!!! a_b ___", "___ ..."], 256, 10**9) == 2 + 1 + 0
    assert token_floor(["x" * 10 + " y"], 1, 10**9) == 1  # at most the limit a text
    # tried from every position, 20,000 underscores took seconds (quadratic); from word starts, milliseconds
    assert token_floor(["_" * 20_000, "!" * 20_000 + "a"], 256, 10**9) == 1


def test_a_batch_encodes_each_distinct_query_once(library: Matcher, monkeypatch: pytest.MonkeyPatch) -> None:
    distinct = list(dict.fromkeys(QUERIES))
    expected = dict(zip(distinct, library.search_batch(distinct, k=5), strict=True))
    encoder = library.snapshot.query_encoder
    seen: list[list[str]] = []
    encode = encoder.encode_queries

    def recorded(texts: list[str], **kwargs: Any) -> np.ndarray:
        seen.append(list(texts))
        return encode(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode_queries", recorded)
    results = library.search_batch(QUERIES * 3, k=5)
    assert seen == [distinct]  # what the budget counts is what is encoded
    for query, hits in zip(QUERIES * 3, results, strict=True):
        assert [(h.id, h.score) for h in hits] == [(h.id, h.score) for h in expected[query]]
