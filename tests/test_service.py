"""The search service: every endpoint with values against the library, the token rule, bounds, refresh."""

from __future__ import annotations

import faulthandler
import json
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_catalogue

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from matching import Matcher
from matching.analysis import Analyzer, matched_spans
from matching.config import ServiceConfig
from matching.errors import ConfigError
from matching.service import create_app, limit_body, read_token
from matching.store import parse_where

TOKEN = "test-token-0123456789"
CONFIG = ServiceConfig(refresh_seconds=0.1, max_k=50, max_candidates=500, max_query_chars=200, max_batch=8)


def wait_ready(client: TestClient, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/ready")
        if r.status_code == 200:
            return dict(r.json())
        assert r.status_code == 503
        time.sleep(0.05)
    raise AssertionError("the service did not become ready")


@pytest.fixture(scope="module")
def client(bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(bundle, token=TOKEN, config=CONFIG)) as c:
        wait_ready(c)
        yield c


def hits_of(matches: list[Any]) -> list[tuple[Any, str, float]]:
    return [(m.id, m.title, round(m.score, 5)) for m in matches]


def hits_json(hits: list[dict[str, Any]]) -> list[tuple[Any, str, float]]:
    return [(h["id"], h["title"], round(h["score"], 5)) for h in hits]


# -- reads ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("retrieval", ["hybrid", "dense", "lexical"])
def test_get_search_returns_what_the_library_returns(client: TestClient, library: Matcher, retrieval: str) -> None:
    r = client.get("/search", params={"q": "acme red coffee maker", "k": 5, "retrieval": retrieval})
    assert r.status_code == 200
    body = r.json()
    want = library.search("acme red coffee maker", 5, retrieval=retrieval)
    assert hits_json(body["hits"]) == hits_of(want)
    assert body["query"] == "acme red coffee maker"
    assert body["generation"] == library.generation
    first, match = body["hits"][0], want[0]
    assert first["metadata"] == match.metadata
    assert first["retrieval_score"] == pytest.approx(match.retrieval_score, abs=1e-6)
    for part in ("dense_score", "lexical_score"):
        assert (first[part] is None) == (getattr(match, part) is None)


def test_post_search_answers_many_queries_as_get_answers_each(client: TestClient) -> None:
    queries = ["acme red coffee maker", "blue desk lamp", "globex yoga mat"]
    r = client.post("/search", json={"queries": queries, "k": 4, "rerank": False})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["query"] for x in results] == queries
    for q, result in zip(queries, results, strict=True):
        one = client.get("/search", params={"q": q, "k": 4, "rerank": "false"}).json()
        assert hits_json(result["hits"]) == hits_json(one["hits"])


WHERES: list[tuple[dict[str, Any], Any]] = [
    ({"brand": "acme"}, lambda d: d.brand == "acme"),
    ({"brand": {"==": "acme"}}, lambda d: d.brand == "acme"),
    ({"brand": {"!=": "acme"}}, lambda d: d.brand != "acme"),
    ({"price": {"<": 30}}, lambda d: d.price < 30),
    ({"price": {"<=": 24.49}}, lambda d: d.price <= 24.49),
    ({"price": {">": 100}}, lambda d: d.price > 100),
    ({"price": {">=": 40, "<": 80}}, lambda d: (d.price >= 40) & (d.price < 80)),
    ({"brand": ["acme", "globex"]}, lambda d: d.brand.isin(["acme", "globex"])),
    ({"brand": {"in": ["acme"]}}, lambda d: d.brand == "acme"),
    ({"brand": {"not in": ["acme", "globex"]}}, lambda d: ~d.brand.isin(["acme", "globex"])),
    ({"colour": None}, lambda d: d.brand == d.brand),  # no title has the field
    ({"brand": {"!=": None}}, lambda d: d.brand == d.brand),
]


@pytest.mark.parametrize(("where", "keep"), WHERES, ids=[json.dumps(w) for w, _ in WHERES])
def test_where_in_json_expresses_every_operator(client: TestClient, where: dict[str, Any], keep: Any) -> None:
    df = make_catalogue()
    allowed = set(df[keep(df)]["id"])
    r = client.get("/search", params={"q": "lamp", "k": 50, "where": json.dumps(where)})
    assert r.status_code == 200, r.text
    assert {h["id"] for h in r.json()["hits"]} == allowed  # k >= the matching titles: every one comes back


def test_score_equals_the_library(client: TestClient, library: Matcher) -> None:
    pairs = [
        ("red kettle", "acme red coffee maker"),
        ("lamp", "not in the catalogue at all"),
        ("red kettle", "blue desk lamp"),
    ]
    r = client.post("/score", json={"pairs": [{"query": q, "title": t} for q, t in pairs]})
    assert r.status_code == 200
    want = library.score_pairs([q for q, _ in pairs], [t for _, t in pairs])
    np.testing.assert_allclose(r.json()["scores"], want, rtol=0, atol=1e-6)


def test_health_ready_info(client: TestClient, library: Matcher) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "generation": library.generation, "count": 40}
    info = client.get("/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()  # everything, paths too
    assert info["count"] == 40
    assert info["metadata_keys"] == ["brand", "price"]
    assert info["limits"]["max_k"] == 50
    assert info["writes"] is True
    assert info["encoder"] == library.info()["encoder"]
    assert client.get("/docs").status_code == 200
    assert "/search" in client.get("/openapi.json").json()["paths"]


def test_info_shows_paths_and_the_source_file_only_with_the_token(client: TestClient, bundle: Path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    full = client.get("/info", headers=auth).json()
    assert full["path"] == str(bundle)
    assert full["source"]["name"] == "DataFrame"
    model = Path(full["encoder"]["source"])
    assert model.is_absolute()
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
        r = client.get("/info", headers=headers)
        public = r.json()
        assert "path" not in public
        assert "name" not in public["source"]
        assert public["source"]["id_column"] == "id"
        assert public["encoder"]["source"] == model.name
        assert str(bundle.parent) not in r.text
        assert str(model.parent) not in r.text
        assert public["metadata_keys"] == ["brand", "price"]  # what the page needs stays
    row = make_catalogue().iloc[0].to_dict()
    r = client.post("/upsert", json={"rows": [row]}, headers=auth)  # a retry of a row as stored
    assert r.status_code == 200
    assert r.json() | {"seconds": 0} == {
        **dict.fromkeys(("added", "updated", "metadata_updated", "removed", "missing", "encoded"), 0),
        "operation": "upsert",
        "unchanged": 1,
        "count": 40,
        "generation": full["generation"],
        "seconds": 0,
        "published": False,
        "folded": False,
    }


def test_metrics_count_requests_errors_and_latency(bundle: Path) -> None:
    with TestClient(create_app(bundle, config=CONFIG)) as c:
        wait_ready(c)
        for _ in range(3):
            assert c.get("/search", params={"q": "lamp"}).status_code == 200
        assert c.get("/search", params={"q": "lamp", "k": 0}).status_code == 400
        text = c.get("/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines['matching_requests_total{route="/search",status="200"}'] == "3"
    assert lines['matching_requests_total{route="/search",status="400"}'] == "1"
    assert lines['matching_errors_total{route="/search"}'] == "1"
    assert lines['matching_request_seconds_count{route="/search"}'] == "4"
    assert lines['matching_request_seconds_bucket{route="/search",le="+Inf"}'] == "4"
    buckets = [int(v) for k, v in lines.items() if k.startswith('matching_request_seconds_bucket{route="/search"')]
    assert buckets == sorted(buckets)  # cumulative
    assert lines["matching_titles"] == "40"
    assert lines["matching_generation"] == "1"


def test_page_is_served(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert 'id="q"' in r.text
    assert "search?" in r.text


def test_highlights_are_the_matched_words(client: TestClient) -> None:
    hit = client.get("/search", params={"q": "Desk LAMPS", "k": 1, "highlight": "true"}).json()["hits"][0]
    marked = [hit["title"][a:b] for a, b in hit["highlights"]]
    assert marked == ["desk", "lamp"]  # "LAMPS" stems to "lamp" and the case of the query does not matter


def test_a_turkish_title_is_found_and_highlighted_in_either_case(tmp_path: Path, tiny_encoder: Any) -> None:
    titles = pd.DataFrame({"id": [1, 2, 3], "title": ["İSTANBUL halı", "Ankara kırmızı kilim", "Straße Karte"]})
    Matcher.build(titles, tmp_path / "tr", encoder=tiny_encoder, show_progress=False).close()
    with TestClient(create_app(tmp_path / "tr", config=CONFIG)) as c:
        wait_ready(c)
        assert c.get("/info").json()["lexical"]["fold"] == 2
        for q, title, marked in [
            ("istanbul", "İSTANBUL halı", ["İSTANBUL"]),
            ("KIRMIZI", "Ankara kırmızı kilim", ["kırmızı"]),
            ("strasse", "Straße Karte", ["Straße"]),
        ]:
            params = {"q": q, "k": 1, "highlight": "true", "retrieval": "lexical"}
            hit = c.get("/search", params=params).json()["hits"][0]
            assert hit["title"] == title
            assert [hit["title"][a:b] for a, b in hit["highlights"]] == marked


def test_matched_spans_follow_the_analyser() -> None:
    title = "Running Shoes, for the Marathon"
    assert [title[a:b] for a, b in matched_spans("run shoe the", title, Analyzer.ENGLISH)] == ["Running", "Shoes"]
    assert [title[a:b] for a, b in matched_spans("run shoe", title, Analyzer.STANDARD)] == []
    cn = "苹果手机壳 Pro"
    assert [cn[a:b] for a, b in matched_spans("手机 pro", cn, Analyzer.CJK)] == ["手机", "Pro"]
    assert matched_spans("", cn, Analyzer.CJK) == []


# -- bounds and bad requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"q": "lamp", "k": 0}, "k must be between 1 and 50"),
        ({"q": "lamp", "k": 51}, "k must be between 1 and 50"),
        ({"q": "lamp", "candidates": 501}, "candidates must be between 1 and 500"),
        ({"q": "x" * 201}, "at most 200"),
        ({"q": "lamp", "where": "{bad"}, "where is not JSON"),
        ({"q": "lamp", "where": "[1, 2]"}, "where must be a JSON object"),
        ({"q": "lamp", "where": '{"price": {"~": 1}}'}, "unknown operator '~'"),
        ({"q": "lamp", "where": '{"price": {"<": 1e999}}'}, "not a finite number"),
        ({"q": "lamp", "where": '{"price": {"<": 99999999999999999999}}'}, "64-bit"),
        ({"q": "lamp", "where": '{"price": {"in": 3}}'}, "needs a list"),
    ],
)
def test_bad_search_gets_400_with_the_fix(client: TestClient, params: dict[str, Any], needle: str) -> None:
    r = client.get("/search", params=params)
    assert r.status_code == 400
    assert needle in r.json()["detail"]


def _deep(depth: int) -> str:
    return '{"price": ' + "[" * depth + "]" * depth + "}"


MALFORMED_WHERES: list[tuple[str, str, str]] = [
    ("nested-1000", _deep(1000), "nests deeper than the JSON parser goes"),
    ("nested-5", '{"price": {"in": [[[1]]]}}', "a list of 1 is not a string, number, bool or None"),
    ("a-list", "[1, 2]", "where must be a JSON object"),
    ("a-number", "3", "got a int"),
    ("300-fields", json.dumps({f"f{i}": i for i in range(300)}), "more than 256 conditions"),
    ("10001-values", json.dumps({"price": [0] * 10_001}, separators=(",", ":")), "more than 10000 values"),
    ("lone-surrogate-value", '{"brand": "\\ud800"}', "not valid Unicode"),
    ("lone-surrogate-field", '{"\\ud800": 1}', "not a metadata field name"),
    ("5000-digits", '{"price": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits)"),
    ("empty-condition", '{"price": {}}', "an empty condition"),
    ("null-range", '{"price": {"<": null}}', "None can only be compared with == or !="),
]


@pytest.mark.parametrize(("where", "needle"), [c[1:] for c in MALFORMED_WHERES], ids=[c[0] for c in MALFORMED_WHERES])
def test_malformed_where_is_400_naming_it_through_get_and_post(client: TestClient, where: str, needle: str) -> None:
    got = client.get("/search", params={"q": "lamp", "where": where})
    posted = client.post(
        "/search", content='{"queries": ["lamp"], "where": ' + where + "}", headers={"content-type": "application/json"}
    )
    for r in (got, posted):
        assert r.status_code == 400, r.text
        assert needle in r.json()["detail"]


def test_random_json_as_where_answers_200_or_400_never_500(bundle: Path) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    text = st.text(st.characters(codec=None, categories=None), max_size=8) | st.sampled_from(["brand", "price"])
    scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text
    ops = st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in", "not in", "~"])
    value = st.recursive(
        scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text | ops, inner, max_size=4)
    )
    where = st.dictionaries(text, value | st.dictionaries(ops, value, max_size=3), max_size=4) | value
    wrapped = st.tuples(where, st.integers(0, 1200)).map(lambda w: "[" * w[1] + json.dumps(w[0]) + "]" * w[1])
    raw = st.one_of(where.map(json.dumps), wrapped)
    with TestClient(create_app(bundle, config=CONFIG), raise_server_exceptions=False) as c:
        wait_ready(c)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(raw)
        def answers(where: str) -> None:
            got = c.get("/search", params={"q": "lamp", "where": where})
            body = '{"queries": ["lamp"], "where": ' + where + "}"
            posted = c.post("/search", content=body, headers={"content-type": "application/json"})
            for r in (got, posted):
                assert r.status_code in (200, 400), (where[:200], r.status_code, r.text[:300])
                if r.status_code == 400:
                    assert isinstance(r.json()["detail"], str)

        answers()


ODD_KEYS = ["a\\b", 'q"k', "tab\tkey", "line\nbreak", "é", "a.b", "x[0]", "$", "", " sp ", '\\"', "ключ"]


def test_every_metadata_key_that_is_stored_can_be_filtered(tmp_path: Path, tiny_encoder: Any) -> None:
    """Keys a JSON path built from the key would miss (backslash, quote, control characters) match like any."""
    frame = pd.DataFrame({"id": range(len(ODD_KEYS)), "title": [f"red lamp {i}" for i in range(len(ODD_KEYS))]})
    for i, key in enumerate(ODD_KEYS):
        frame[key] = pd.Series([100 + i if j == i else "other" for j in range(len(ODD_KEYS))], dtype=object)
    with Matcher.build(frame, tmp_path / "odd", encoder=tiny_encoder, show_progress=False) as m:
        for i, key in enumerate(ODD_KEYS):
            assert [h.id for h in m.search("lamp", k=20, where={key: 100 + i})] == [i], key
            assert len(m.search("lamp", k=20, where={key: {"!=": 100 + i}})) == len(ODD_KEYS) - 1
    with TestClient(create_app(tmp_path / "odd", token=TOKEN, config=CONFIG)) as c:
        wait_ready(c)
        assert c.get("/info").json()["metadata_keys"] == sorted(ODD_KEYS)  # each one filterable, so each listed
        for i, key in enumerate(ODD_KEYS):
            r = c.get("/search", params={"q": "lamp", "k": 20, "where": json.dumps({key: {"in": [100 + i]}})})
            assert [h["id"] for h in r.json()["hits"]] == [i], key
        r = c.post(
            "/upsert",
            content='{"rows": [{"id": 99, "title": "lamp", "\\ud800": 1}]}',
            headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"},
        )
        assert r.status_code == 400
        assert (
            r.json()["detail"]
            == "row 0: field name '\\ud800' holds a lone surrogate (half of a UTF-16 pair); fix the name"
        )


def test_values_sent_over_http_round_trip_or_are_refused_naming_row_and_column(
    tmp_path: Path, tiny_encoder: Any
) -> None:
    frame = pd.DataFrame({"id": [1, 2], "title": ["red lamp", "blue lamp"]})
    Matcher.build(frame, tmp_path / "v", encoder=tiny_encoder, show_progress=False).close()
    headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(tmp_path / "v", token=TOKEN, config=CONFIG)) as c:
        wait_ready(c)
        row = '{"id": 3, "title": "green lamp", "tags": [1, [2, "x"]], "o": {"k": null}, "gap": NaN, '
        row += '"n": 12345678901234567890}'
        r = c.post("/upsert", content='{"rows": [' + row + "]}", headers=headers)
        assert r.status_code == 200, r.text
        hit = c.get("/search", params={"q": "green lamp", "k": 1, "where": '{"gap": null}'}).json()["hits"][0]
        assert hit["id"] == 3
        assert hit["metadata"] == {"tags": [1, [2, "x"]], "o": {"k": None}, "gap": None, "n": 12345678901234567890}
        for bad, message in [
            ('{"id": 4, "title": ["a", "b"]}', "row 1: the title column 'title' holds ['a', 'b'], not text"),
            ('{"id": true, "title": "x"}', "row 1: the id True in column 'id' is not a string or a number"),
            ('{"id": 4, "title": "x", "v": Infinity}', "row 1 (id '4'): column 'v' holds inf"),
            ('{"id": 4, "title": "x", "v": [-Infinity]}', "row 1 (id '4'): column 'v' holds -inf"),
        ]:
            r = c.post("/upsert", content='{"rows": [' + bad + "]}", headers=headers)
            assert r.status_code == 400
            assert message in r.json()["detail"]
        assert c.get("/ready").json()["count"] == 3


def test_bad_bodies(client: TestClient) -> None:
    r = client.post("/search", json={"queries": ["a"] * 9})
    assert r.status_code == 400
    assert "at most 8" in r.json()["detail"]
    assert client.post("/search", json={"queries": []}).status_code == 400
    assert client.post("/search", json={"queries": ["a"], "kk": 3}).status_code == 422  # unknown field
    assert client.post("/search", json={"queries": ["a"], "retrieval": "fuzzy"}).status_code == 422
    assert client.get("/search").status_code == 422  # no q
    assert client.post("/score", json={"pairs": []}).status_code == 400
    r = client.post("/score", json={"pairs": [{"query": "a", "title": "b" * 201}]})
    assert r.status_code == 400
    assert "at most 200" in r.json()["detail"]
    r = client.post(
        "/search", content=b"{" + b" " * (8 * 1024 * 1024) + b"}", headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert "body over" in r.json()["detail"]


def test_streamed_body_over_the_limit_is_413_before_the_app_reads_it() -> None:
    seen: list[Any] = []
    called: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(True)

    async def run() -> None:
        chunks = [{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 3

        async def receive() -> Any:
            return chunks.pop(0)

        async def send(message: Any) -> None:
            seen.append(message)

        await limit_body(app, 100)({"type": "http", "headers": []}, receive, send)

    import asyncio

    asyncio.run(run())
    assert seen[0]["status"] == 413
    assert json.loads(seen[1]["body"]) == {"detail": "request body over 100 bytes; send fewer queries, pairs or rows"}
    assert not called


def _chunks(n: int) -> Iterator[bytes]:
    """A JSON search body sent chunked (no Content-Length): ``n`` pieces of 100 bytes in its one query."""
    yield b'{"queries": ["'
    for _ in range(n):
        yield b"x" * 100
    yield b'"]}'


def test_a_chunked_body_answers_as_a_declared_one(bundle: Path) -> None:
    config = ServiceConfig(max_body_bytes=1000, max_query_chars=2000)
    with TestClient(create_app(bundle, config=config)) as c:
        wait_ready(c)
        json_type = {"content-type": "application/json"}
        over = c.post("/search", content=_chunks(20), headers=json_type)
        assert over.request.headers["transfer-encoding"] == "chunked"
        declared = c.post("/search", content=b"".join(_chunks(20)), headers=json_type)
        for r in (over, declared):
            assert r.status_code == 413
            assert r.json() == {"detail": "request body over 1000 bytes; send fewer queries, pairs or rows"}
        under = c.post("/search", content=_chunks(5), headers=json_type)  # replayed to the app whole
        assert under.status_code == 200
        assert under.json()["results"][0]["query"] == "x" * 500


def test_no_redirect_follows_a_forged_host(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}", "Host": "evil.example"}
    for method, url, body in [("POST", "/add/", {"rows": []}), ("POST", "/search/", {"queries": ["a"]})]:
        r = client.request(method, url, json=body, headers=auth, follow_redirects=False)
        assert (r.status_code, r.headers.get("location")) == (404, None)
    r = client.get("/search/", params={"q": "lamp"}, headers={"Host": "evil.example"}, follow_redirects=False)
    assert (r.status_code, r.headers.get("location")) == (404, None)
    assert client.get("/search", params={"q": "lamp"}, headers={"Host": "evil.example"}).status_code == 200


# -- writes and the token ----------------------------------------------------------------------------


def test_token_rule(tmp_path: Path, tiny_encoder: Any) -> None:
    path = tmp_path / "b"
    Matcher.build(make_catalogue(), path, encoder=tiny_encoder, show_progress=False).close()
    row = {"rows": [{"id": 1, "title": "acme teal teapot", "brand": "acme", "price": 9.5}]}
    with TestClient(create_app(path, config=CONFIG)) as off:
        wait_ready(off)
        r = off.post("/add", json=row, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 403
        assert "--token-file" in r.json()["detail"]
    with TestClient(create_app(path, token=TOKEN, config=CONFIG)) as c:
        wait_ready(c)
        r = c.post("/add", json=row)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/add", json=row, headers={"Authorization": "Basic abc"}).status_code == 401
        assert c.post("/add", json=row, headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert c.post("/remove", json={"ids": [1000]}, headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert c.get("/ready").json()["count"] == 40  # nothing written
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = c.post("/add", json=row, headers=auth)
        assert r.status_code == 200
        assert r.json()["added"] == 1
        assert r.json()["count"] == 41
        hit = c.get("/search", params={"q": "acme teal teapot", "k": 1}).json()["hits"][0]
        assert (hit["id"], hit["title"], hit["metadata"]) == (1, "acme teal teapot", {"brand": "acme", "price": 9.5})
        r = c.post("/add", json=row, headers=auth)
        assert r.status_code == 400
        assert "1" in r.json()["detail"]
        up = {"rows": [{"id": 1, "title": "acme teal teapot", "brand": "acme", "price": 7.0}]}
        assert c.post("/upsert", json=up, headers=auth).json()["metadata_updated"] == 1
        r = c.post("/remove", json={"ids": [1, 1000]}, headers=auth)
        assert r.json()["removed"] == 2
        assert r.json()["count"] == 39
        r = c.post("/remove", json={"ids": [123456]}, headers=auth)
        assert r.status_code == 400
        assert "123456" in r.json()["detail"]
        assert c.post("/remove", json={"ids": [123456], "missing_ok": True}, headers=auth).status_code == 200
    assert len(Matcher.load(path, encoder=tiny_encoder)) == 39


GOOD_TOKEN = "0123456789abcdef-_.~!"


@pytest.mark.parametrize(
    ("text", "token"),
    [
        (f" {GOOD_TOKEN} \n", GOOD_TOKEN),
        (f"{GOOD_TOKEN}\r\n", GOOD_TOKEN),
        (f"\ufeff{GOOD_TOKEN}", GOOD_TOKEN),  # an editor's byte-order mark
        ("x" * 16, "x" * 16),
    ],
    ids=["spaces-around", "crlf", "bom", "16-chars"],
)
def test_read_token_takes_the_stripped_first_line(tmp_path: Path, text: str, token: str) -> None:
    path = tmp_path / "t"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_token(path) == token


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("\n", "has nothing on its first line"),
        (f"\n{GOOD_TOKEN}", "has nothing on its first line"),
        ("x" * 15, "has 15 characters"),
        (f"{GOOD_TOKEN[:8]} {GOOD_TOKEN[8:]}", "holds ' ', which a header cannot carry"),
        (f"{GOOD_TOKEN}é", "holds 'é', which a header cannot carry"),
        (f"{GOOD_TOKEN}\t", None),  # stripped: fine
    ],
    ids=["empty", "blank-first-line", "15-chars", "a-space", "non-ascii", "tab-after"],
)
def test_read_token_refuses_what_no_header_carries(tmp_path: Path, text: str, message: str | None) -> None:
    path = tmp_path / "t"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    if message is None:
        assert read_token(path) == GOOD_TOKEN
        return
    with pytest.raises(ConfigError) as caught:
        read_token(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
    assert "16 or more printable ASCII characters, no spaces, on the first line" in str(caught.value)
    with pytest.raises(ConfigError, match="cannot read the token file"):
        read_token(tmp_path / "missing")


def test_read_token_warns_of_other_readers_and_other_lines(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text(f"{GOOD_TOKEN}\nsecond line\n", encoding="utf-8")
    path.chmod(0o600)
    with pytest.warns(UserWarning, match="more than one line; only the first is the token"):
        assert read_token(path) == GOOD_TOKEN
    path.write_text(GOOD_TOKEN, encoding="utf-8")
    path.chmod(0o644)
    with pytest.warns(UserWarning, match=r"readable by other users \(mode 644\); chmod 600 it"):
        assert read_token(path) == GOOD_TOKEN


def test_a_title_added_by_another_process_is_found_within_5_s(tmp_path: Path, tiny_encoder: Any) -> None:
    path = tmp_path / "b"
    Matcher.build(make_catalogue(), path, encoder=tiny_encoder, show_progress=False).close()
    new = tmp_path / "new.csv"
    pd.DataFrame([{"id": 5, "title": "zenith violet umbrella", "brand": "zenith", "price": 3.0}]).to_csv(
        new, index=False
    )
    with TestClient(create_app(path, config=CONFIG)) as c:
        before = wait_ready(c)["generation"]
        pinned = c.app.state.service.pinned()  # type: ignore[attr-defined]
        pinned_hits = hits_of(pinned.search("zenith violet umbrella", 3))
        done = subprocess.run(
            [sys.executable, "-m", "matching", "add", str(path), str(new), "-q"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        published = time.monotonic()
        while time.monotonic() - published < 5:
            hit = c.get("/search", params={"q": "zenith violet umbrella", "k": 1}).json()
            if hit["hits"][0]["id"] == 5:
                break
            time.sleep(0.05)
        assert hit["hits"][0]["id"] == 5
        assert hit["generation"] != before
        assert c.get("/ready").json()["count"] == 41
        # a request's snapshot is its own: a view pinned before the change still answers as before
        assert hits_of(pinned.search("zenith violet umbrella", 3)) == pinned_hits


def test_requests_never_fail_while_another_writer_publishes(tmp_path: Path, tiny_encoder: Any) -> None:
    path = tmp_path / "b"
    Matcher.build(make_catalogue(), path, encoder=tiny_encoder, show_progress=False).close()
    errors: list[str] = []
    stop = threading.Event()
    with TestClient(create_app(path, config=CONFIG)) as c:
        wait_ready(c)

        def read() -> None:
            while not stop.is_set():
                r = c.get("/search", params={"q": "acme desk lamp", "k": 5})
                if r.status_code != 200 or len(r.json()["hits"]) != 5:
                    errors.append(r.text)

        readers = [threading.Thread(target=read, daemon=True) for _ in range(3)]
        for t in readers:
            t.start()
        writer = Matcher.load(path, encoder=tiny_encoder)
        generations = set()
        for i in range(6):
            writer.add(pd.DataFrame([{"id": 10 + i, "title": f"acme desk lamp number {i}"}]), show_progress=False)
            time.sleep(0.15)
            generations.add(c.get("/ready").json()["generation"])
        stop.set()
        for t in readers:
            t.join(timeout=60)
        writer.close()
        if any(t.is_alive() for t in readers):  # seen once (1 of ~9 suites): a request that never returned
            faulthandler.dump_traceback(all_threads=True)
            pytest.fail("a search request did not return within 60 s (every thread's stack is on stderr)")
    assert errors == []
    assert len(generations) >= 3  # the service moved along with the writer


# -- where parsing (CLI) and threads --------------------------------------------------------------------


def test_cli_where_takes_a_range_on_one_field_and_booleans() -> None:
    assert parse_where(["price>=10", "price<=20"]) == {"price": {">=": 10, "<=": 20}}
    assert parse_where(["flag=true", "brand=acme", "price<5"]) == {"flag": True, "brand": "acme", "price": ("<", 5)}
    with pytest.raises(Exception, match="given twice"):
        parse_where(["price<5", "price<6"])


def test_faiss_thread_setting_is_per_thread() -> None:
    """index._threads_for sets OpenMP's thread count for the calling thread only (OpenMP's nthreads-var is a
    per-thread setting): a search holding one thread does not change what a concurrent thread sees."""
    from matching.vectors.faiss import _threads_for

    outside = faiss.omp_get_max_threads()
    inside = threading.Event()
    release = threading.Event()
    seen: list[int] = []

    def hold() -> None:
        with _threads_for(1):
            seen.append(faiss.omp_get_max_threads())
            inside.set()
            release.wait(10)
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(10)
    assert faiss.omp_get_max_threads() == outside
    other: list[int] = []
    probe = threading.Thread(target=lambda: other.append(faiss.omp_get_max_threads()))
    probe.start()
    probe.join()
    release.set()
    t.join()
    assert seen[0] == 1
    assert other == [outside]
    assert faiss.omp_get_max_threads() == outside


def test_written_rows_keep_their_values_and_bad_text_is_a_400(tmp_path: Path, tiny_encoder: Any) -> None:
    path = tmp_path / "b"
    Matcher.build(make_catalogue(), path, encoder=tiny_encoder, show_progress=False).close()
    big = 2**53 + 1
    rows = {"rows": [{"id": 1, "title": "teal teapot", "stock": big}, {"id": 2, "title": "teal kettle"}]}
    with TestClient(create_app(path, token=TOKEN, config=CONFIG)) as c:
        wait_ready(c)
        assert c.post("/add", json=rows, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        hit = c.get("/search", params={"q": "teal teapot", "k": 1, "retrieval": "lexical"}).json()["hits"][0]
        assert hit["metadata"] == {"stock": big}  # not 9007199254740992.0
        r = c.post(
            "/search", content=b'{"queries": ["teal \\ud800 teapot"]}', headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        assert "lone surrogate" in r.json()["detail"]
