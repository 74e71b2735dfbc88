"""Hybrid retrieval: BM25 inside the bundle, the label-free fusion, lexical features, CJK catalogues, [UNK] share."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import select
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_catalogue, make_tiny_bert

from matching import DeadlineError, Matcher, deadline, overlap
from matching.analysis import Analyzer, analyze, jieba_available, resolve_analyzer
from matching.bundle import read_manifest, write_manifest
from matching.config import EncoderConfig, ScorerConfig
from matching.encoder import Encoder
from matching.errors import ConfigError
from matching.features import (
    DENSE_CEILING,
    DENSE_FLOOR,
    DENSE_SPAN,
    KNOWN_POWER,
    adaptive_weights,
    length_lift,
    length_ratio,
    pair_features,
)
from matching.layout import SCORER_CONFIG
from matching.scorer import Scorer
from matching.search import Fused, Hit, HybridRetriever, NoReranker, Queries, ScorerReranker, search
from matching.types import Fusion

QUERIES = ["acme black running shoes", "wireless headphones", "desk lamp white", "coffee"]


@pytest.fixture
def hybrid(tmp_path: Path, tiny_encoder: Any) -> Matcher:
    return Matcher.build(make_catalogue(), tmp_path / "h", encoder=tiny_encoder, show_progress=False)


def fused_by_hand(
    m: Matcher, query: str, ceiling: float = 1.0, floor: float = 0.35, span: float = 15.0, power: float = 1.5
) -> dict[Any, float]:
    """The fusion formula over every live title: w * centred cosine + (1 - w) * min(1, bm25 / bm25 of the query as a
    title), the cosine centred on the catalogue's mean cosine c as (cos - c) / (1 - c),
    with the adaptive w = ceiling * (share of the query's tokens that are not [UNK]) ** power * (f + (1 - f) *
    shorter / longer distinct-term count), f = floor + (1 - floor) * max(0, 1 - longer / span) (no lift where span
    is 0), each part counted here from the texts themselves (today's rule: 1.0, 0.35, 15, 1.5)."""
    snap = m.snapshot
    assert snap.lexical is not None
    rows = snap.store.live_ids()
    q = snap.query_encoder.encode_queries([query])[0]
    cos = np.asarray(snap.store.vectors[rows]) @ q
    bm25 = snap.lexical.score_rows(query, rows).astype(np.float64)
    own = float(snap.lexical.score_texts(query, [query])[0])
    tokenizer = snap.query_encoder.tokenizer
    tokens = tokenizer(query, add_special_tokens=False)["input_ids"]
    known = 1 - tokens.count(tokenizer.unk_token_id) / len(tokens)
    # distinct terms, a Chinese text's character terms ("_" + the character) aside
    n_query = len({t for t in analyze(query, snap.lexical.analyzer) if not t.startswith("_")})
    n_titles = np.array(
        [
            len({t for t in analyze(r.title, snap.lexical.analyzer) if not t.startswith("_")})
            for r in snap.store.get(rows.tolist())
        ]
    )
    ratio = np.minimum(n_query, n_titles) / np.maximum(n_query, n_titles)
    f = floor + (1 - floor) * (np.clip(1 - np.maximum(n_query, n_titles) / span, 0, 1) if span else 0)
    w = ceiling * known**power * (f + (1 - f) * ratio)
    vectors = np.asarray(snap.store.vectors[rows], dtype=np.float64)
    centre = float(vectors.mean(axis=0) @ vectors.mean(axis=0))  # the mean cosine of two titles drawn at random
    fused = w * (cos - centre) / (1 - centre) + (1 - w) * np.clip(bm25 / own, 0, 1)
    ids = [snap.store.external_id(r.external_id) for r in snap.store.get(rows.tolist())]
    return dict(zip(ids, fused.tolist(), strict=True))


def assert_all_follow(m: Matcher, query: str, expected: dict[Any, float]) -> None:
    """Retrieval, reranking and pair scoring of ``query`` all give ``expected`` (id -> fused score)."""
    hits = m.search(query, k=10, candidates=40)
    assert [h.score for h in hits] == pytest.approx(sorted(expected.values(), reverse=True)[:10], abs=1e-5)
    for h in hits:
        assert h.retrieval_score == pytest.approx(expected[h.id], abs=1e-5)
    titles = [h.title for h in hits]
    assert m.score_pairs([query] * len(titles), titles).tolist() == pytest.approx(
        [expected[h.id] for h in hits], abs=1e-5
    )


def test_todays_rule() -> None:
    assert (DENSE_CEILING, DENSE_FLOOR, DENSE_SPAN, KNOWN_POWER) == (1.0, 0.35, 15.0, 1.5)


def earlier_rule(m: Matcher, dropped: tuple[str, ...], ceiling: float = 1.0) -> Matcher:
    """``m``'s bundle as an earlier adaptive rule wrote it: ``dropped`` entries missing from the manifest and the
    scorer's config, and ``ceiling`` as the dense weight in both; reloaded."""
    gen = m.path / str(m.snapshot.generation)
    config = json.loads((gen / SCORER_CONFIG).read_text(encoding="utf-8"))
    config = {k: v for k, v in config.items() if k not in dropped} | {"dense_weight": ceiling}
    Scorer(ScorerConfig.from_dict(config)).save(gen)  # untrained, of the shape that rule gave it
    manifest = read_manifest(gen, verify=False)
    assert manifest.lexical is not None
    lexical = {k: v for k, v in manifest.lexical.items() if k not in dropped} | {"dense_weight": ceiling}
    m.close()
    write_manifest(gen, dataclasses.replace(manifest, lexical=lexical))
    return Matcher.load(m.path)


def first_rule(m: Matcher) -> Matcher:
    """``m``'s bundle as the first adaptive rule wrote it: ceiling 0.85, no floor and no span recorded."""
    return earlier_rule(m, ("dense_floor", "dense_span", "known_power"), 0.85)


@pytest.mark.parametrize("query", QUERIES[:2])
def test_a_bundle_of_the_first_rule_keeps_it(hybrid: Matcher, query: str) -> None:
    """Ceiling 0.85 and floor 0.5 where the bundle recorded no floor: retrieval, reranking and pair scoring."""
    old = first_rule(hybrid)
    assert (old.snapshot.dense_weight, old.snapshot.dense_floor) == (0.85, 0.5)
    assert old.snapshot.scorer.config.dense_floor == 0.5
    expected = fused_by_hand(old, query, 0.85, 0.5, 0, 1)
    assert_all_follow(old, query, expected)
    assert expected != fused_by_hand(old, query)
    old.close()


@pytest.mark.parametrize("query", QUERIES[1:3])  # 2 and 3 terms against titles of 4: the lift moves them
def test_a_bundle_of_the_floor_rule_keeps_it(hybrid: Matcher, query: str) -> None:
    """Ceiling 1.0 and floor 0.35 with no length lift where the bundle recorded no span: retrieval, reranking and
    pair scoring; the lift is what moves today's rule from it."""
    old = earlier_rule(hybrid, ("dense_span", "known_power"))
    assert old.snapshot.fused.span == 0.0
    assert old.snapshot.scorer.config.dense_span == 0.0
    expected = fused_by_hand(old, query, 1.0, 0.35, 0, 1)
    assert_all_follow(old, query, expected)
    assert expected != fused_by_hand(old, query)
    old.close()


@pytest.mark.parametrize("query", QUERIES)
def test_untrained_hybrid_ranks_by_the_fusion_formula(hybrid: Matcher, query: str) -> None:
    assert hybrid.retrieval == "hybrid"
    expected = fused_by_hand(hybrid, query)
    hits = hybrid.search(query, k=10, candidates=40)
    for h in hits:
        assert h.retrieval_score == pytest.approx(expected[h.id], abs=1e-5)
        assert h.score == pytest.approx(h.retrieval_score, abs=1e-6)  # untrained reranker = fusion
    best = sorted(expected.values(), reverse=True)[:10]
    assert [h.score for h in hits] == pytest.approx(best, abs=1e-5)


def test_adaptive_weights_by_hand() -> None:
    """w = ceiling * known * (floor + (1 - floor) * ratio); ratio = shorter / longer distinct-term count, 1 when both
    are 0. Today's rule (1.0, 0.35) and the first one (0.85, 0.5), which bundles built under it keep."""
    ratio = length_ratio(np.array([3, 0, 2, 8]), np.array([6, 0, 2, 2]))
    assert ratio.tolist() == pytest.approx([0.5, 1.0, 1.0, 0.25])
    assert adaptive_weights(0.5, ratio, 1.0, 0.35).tolist() == pytest.approx([0.3375, 0.5, 0.5, 0.25625])
    assert adaptive_weights(0.5, ratio, 0.85, 0.5).tolist() == pytest.approx([0.31875, 0.425, 0.425, 0.265625])
    weights = adaptive_weights(np.array([1.0, 0.0]), np.array([1.0, 1.0]), 0.85, 0.5)
    assert weights.tolist() == pytest.approx([0.85, 0.0])
    assert adaptive_weights(1.0, np.array([0.0]), 1.0, 0.35).tolist() == pytest.approx([0.35])
    # today's power 1.5: a quarter of the query read weighs the cosine at 0.25 ** 1.5 = 0.125, not 0.25
    assert adaptive_weights(0.25, np.array([1.0]), 1.0, 0.35, 0.0, 1.5).tolist() == pytest.approx([0.125])
    assert adaptive_weights(np.array([1.0, 0.0]), np.array([1.0, 1.0]), 1.0, 0.35, 0.0, 1.5).tolist() == [1.0, 0.0]


def test_the_length_lift_by_hand() -> None:
    """lift = max(0, 1 - longer / span) of the two distinct-term counts (0 without a span); the floor rises to
    floor + (1 - floor) * lift: 3 and 6 terms at span 15 lift 0.6, so w = 0.5 * (0.74 + 0.26 * 0.5) = 0.435."""
    lift = length_lift(np.array([3, 0, 20, 15]), np.array([6, 0, 2, 1]), 15.0)
    assert lift.tolist() == pytest.approx([0.6, 1.0, 0.0, 0.0])
    assert length_lift(np.array([3]), np.array([6]), 0.0).tolist() == [0.0]
    ratio = length_ratio(np.array([3, 0, 20, 15]), np.array([6, 0, 2, 1]))
    weights = adaptive_weights(0.5, ratio, 1.0, 0.35, lift)
    assert weights.tolist() == pytest.approx([0.435, 0.5, 0.5 * (0.35 + 0.65 * 0.1), 0.5 * (0.35 + 0.65 / 15)])


def test_pair_features_hold_the_lift_after_the_known_share(hybrid: Matcher) -> None:
    lexical = hybrid.snapshot.lexical
    assert lexical is not None
    query = "acme black running shoes"
    titles = ["acme running shoes", " ".join(f"word{i}" for i in range(20))]
    terms = [len(set(analyze(t, lexical.analyzer, lexical.fold))) for t in [query, *titles]]
    assert terms == [4, 3, 20]
    bm25 = lexical.score_texts(query, titles)
    features = pair_features(lexical, query, titles, bm25, 1.0, 0.5, 15.0)
    assert features[:, 4].tolist() == [0.5, 0.5]
    assert features[:, 5].tolist() == pytest.approx([1 - 4 / 15, 0.0])
    assert pair_features(lexical, query, titles, bm25, 1.0, 0.5).shape == (2, 5)


def test_a_query_the_encoder_cannot_read_leans_on_words(hybrid: Matcher) -> None:
    """Han characters are [UNK] to the tiny English vocabulary: the dense weight falls with the known share, and
    retrieval, reranking and pair scoring all follow the same formula."""
    query = "跑步鞋 running shoes"
    tokenizer = hybrid.snapshot.query_encoder.tokenizer
    tokens = tokenizer(query, add_special_tokens=False)["input_ids"]
    assert 0 < tokens.count(tokenizer.unk_token_id) < len(tokens)
    assert_all_follow(hybrid, query, fused_by_hand(hybrid, query))


def test_a_bundle_of_the_lift_rule_keeps_the_known_share_linear(hybrid: Matcher) -> None:
    """Where the bundle recorded no power (the rule before it), the known share weighs the cosine as it is:
    retrieval, reranking and pair scoring; the power is what moves today's rule from it on a query half unread."""
    query = "跑步鞋 running shoes"
    old = earlier_rule(hybrid, ("known_power",))
    assert old.snapshot.fused.power == 1.0
    assert old.snapshot.scorer.config.known_power == 1.0
    expected = fused_by_hand(old, query, power=1)
    assert_all_follow(old, query, expected)
    assert expected != pytest.approx(fused_by_hand(old, query), abs=1e-3)
    old.close()


@pytest.mark.parametrize("query", QUERIES)
def test_lexical_search_equals_brute_force_bm25(hybrid: Matcher, query: str) -> None:
    snap = hybrid.snapshot
    assert snap.lexical is not None
    rows = snap.store.live_ids()
    bm25 = snap.lexical.score_texts(query, [r.title for r in snap.store.get(rows.tolist())])
    order = [i for i in np.lexsort((rows, -bm25)) if bm25[i] > 0][:5]
    hits = hybrid.search(query, k=5, retrieval="lexical", rerank=False)
    assert [h.lexical_score for h in hits] == pytest.approx(bm25[order].tolist(), rel=1e-6)
    assert {h.id for h in hits} == {
        snap.store.external_id(snap.store.get([int(rows[i])])[0].external_id) for i in order
    }


def test_changes_keep_hybrid_equal_to_a_fresh_build(hybrid: Matcher, tiny_encoder: Any, tmp_path: Path) -> None:
    new = pd.DataFrame({"id": [1, 2], "title": ["Acme ultra wireless earbuds", "Globex steel water bottle"]})
    hybrid.add(new, show_progress=False)
    catalogue = make_catalogue()
    changed = catalogue.iloc[:3].assign(title=lambda f: f["title"] + " pro")
    hybrid.upsert(changed, show_progress=False)
    hybrid.remove([int(catalogue["id"].iloc[5]), 2])
    expected = hybrid.catalogue()
    with Matcher.build(expected, tmp_path / "fresh", encoder=tiny_encoder, show_progress=False) as fresh:
        assert hybrid.snapshot.lexical is not None
        assert fresh.snapshot.lexical is not None
        for query in [*QUERIES, "ultra earbuds pro"]:
            a = [(h.id, round(h.score, 5)) for h in hybrid.search(query, k=15)]
            b = [(h.id, round(h.score, 5)) for h in fresh.search(query, k=15)]
            assert a == b
    hybrid.compact(show_progress=False)
    assert next(h.id for h in hybrid.search("ultra earbuds pro", k=3)) == 1


def test_score_pairs_equals_the_fusion_untrained(hybrid: Matcher) -> None:
    titles = make_catalogue()["title"].tolist()[:6]
    query = "black running shoes"
    scores = hybrid.score_pairs([query] * len(titles), titles)
    expected = fused_by_hand(hybrid, query)
    ids = make_catalogue()["id"].tolist()[:6]
    assert scores.tolist() == pytest.approx([expected[i] for i in ids], abs=1e-5)


def test_positives_only_pairs_train_listwise_by_default(hybrid: Matcher) -> None:
    cat = make_catalogue()
    pairs = pd.DataFrame({"query": [t.split(" ", 1)[1] for t in cat["title"]], "title": cat["title"], "label": 1})
    report = hybrid.train_scorer(pairs, epochs=2, show_progress=False, save=False)
    assert report.loss == "listwise"
    assert report.loss_reason.startswith("positives only: each positive ranked against 20 negatives")
    assert report.best_metric >= report.baseline


CHINESE = [
    "无线蓝牙耳机",
    "男士跑步鞋",
    "不锈钢保温杯",
    "办公室台灯",
    "咖啡机家用",
    "真皮钱包",
    "瑜伽垫加厚",
    "游戏笔记本电脑",
]


def test_a_chinese_catalogue_warns_about_unknown_tokens_and_matches_by_words(
    tmp_path: Path, tiny_encoder: Any, caplog: pytest.LogCaptureFixture
) -> None:
    frame = pd.DataFrame({"id": range(len(CHINESE)), "title": CHINESE})
    with caplog.at_level(logging.WARNING):
        m = Matcher.build(frame, tmp_path / "zh", encoder=tiny_encoder, show_progress=False)
    assert "unknown to the encoder" in caplog.text
    assert "--model" in caplog.text
    assert m.manifest.source["unknown_token_share"] > 0.5
    assert (m.manifest.lexical or {})["analyzer"] == ("chinese-mixed" if jieba_available() else "chinese-chars")
    assert m.search("保温杯", k=1)[0].title == "不锈钢保温杯"
    assert m.search("跑步鞋", k=1, retrieval="lexical")[0].title == "男士跑步鞋"


@pytest.mark.skipif(not jieba_available(), reason="jieba (matching[cjk]) is not installed")
@pytest.mark.parametrize("query", ["保温杯", "男士跑步鞋 黑色", "蓝牙耳机无线"])
def test_a_chinese_catalogue_follows_the_fusion_by_hand(tmp_path: Path, query: str) -> None:
    # an encoder that reads these characters (no [UNK]): the dense weight, which counts words, is not 0
    model = make_tiny_bert(tmp_path / "zh-bert", extra=sorted(set("".join(CHINESE) + query) - {" "}))
    encoder = Encoder.from_pretrained(EncoderConfig(model=str(model), preset="exact"))
    frame = pd.DataFrame({"id": range(len(CHINESE)), "title": CHINESE})
    m = Matcher.build(frame, tmp_path / "zh", encoder=encoder, show_progress=False)
    assert m.snapshot.lexical is not None
    assert m.snapshot.lexical.analyzer == Analyzer.CHINESE_MIXED
    assert encoder.known_shares([query])[0] == 1.0
    assert_all_follow(m, query, fused_by_hand(m, query))


@pytest.mark.parametrize("analyzer", ["chinese", "chinese-mixed"])
def test_a_jieba_analyser_without_jieba_is_refused_before_encoding(
    tmp_path: Path, tiny_encoder: Any, monkeypatch: pytest.MonkeyPatch, analyzer: str
) -> None:
    import matching.analysis
    import matching.matcher

    monkeypatch.setattr(matching.analysis, "jieba_available", lambda: False)
    monkeypatch.setattr(matching.matcher, "build_bundle", lambda *a, **k: pytest.fail("built"))
    frame = pd.DataFrame({"id": range(len(CHINESE)), "title": CHINESE})
    with pytest.raises(ConfigError, match=r"needs jieba: pip install 'matching\[cjk\]'"):
        Matcher.build(frame, tmp_path / "zh", encoder=tiny_encoder, analyzer=analyzer, show_progress=False)


def test_without_jieba_chinese_is_read_as_characters(
    tmp_path: Path, tiny_encoder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'auto' picks chinese-chars for Han text without jieba (each character a term), cjk for kana."""
    import matching.analysis

    monkeypatch.setattr(matching.analysis, "jieba_available", lambda: False)
    assert resolve_analyzer(CHINESE) == Analyzer.CHINESE_CHARS
    assert resolve_analyzer(["ワイヤレスイヤホン", "ランニングシューズ"]) == Analyzer.CJK
    assert analyze("无线蓝牙耳机 iPhone 手机壳", Analyzer.CHINESE_CHARS) == [
        *"无线蓝牙耳机",
        "iphon",
        *"手机壳",
    ]
    frame = pd.DataFrame({"id": range(len(CHINESE)), "title": CHINESE})
    m = Matcher.build(frame, tmp_path / "zh", encoder=tiny_encoder, show_progress=False)
    assert (m.manifest.lexical or {})["analyzer"] == "chinese-chars"
    assert m.search("跑步鞋", k=1, retrieval="lexical")[0].title == "男士跑步鞋"
    m.close()
    assert Matcher.load(tmp_path / "zh").search("跑步鞋", k=1, retrieval="lexical")[0].title == "男士跑步鞋"


def test_an_english_catalogue_does_not_warn(
    tmp_path: Path, tiny_encoder: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        m = Matcher.build(make_catalogue(), tmp_path / "en", encoder=tiny_encoder, show_progress=False)
    assert "unknown to the encoder" not in caplog.text
    assert m.manifest.source["unknown_token_share"] < 0.05
    assert (m.manifest.lexical or {})["analyzer"] == "english"


@pytest.mark.skipif(not jieba_available(), reason="jieba (matching[cjk]) is not installed")
def test_the_chinese_analysers_cut_words_and_are_chosen_for_han_text_only() -> None:
    assert analyze("无线蓝牙耳机 iPhone 手机壳", Analyzer.CHINESE) == ["无线", "蓝牙", "耳机", "iphon", "手机", "壳"]
    assert analyze("无线蓝牙耳机 iPhone 手机壳", Analyzer.CHINESE_MIXED) == [
        *("无线", "蓝牙", "耳机", "_无", "_线", "_蓝", "_牙", "_耳", "_机"),
        "iphon",
        *("手机", "壳", "_手", "_机", "_壳"),
    ]
    assert resolve_analyzer(CHINESE) == Analyzer.CHINESE_MIXED
    assert resolve_analyzer(["ワイヤレスイヤホン", "ランニングシューズ"]) == Analyzer.CJK  # kana: not for jieba
    assert resolve_analyzer(["wireless headphones"]) == Analyzer.ENGLISH


def test_store_titles_are_the_live_rows_in_order(hybrid: Matcher) -> None:
    hybrid.remove([int(make_catalogue()["id"].iloc[2])])
    store = hybrid.store
    expected = [(r.row_id, r.title) for rows in store.rows() for r in rows]
    assert [pair for part in store.titles(batch=7) for pair in part] == expected
    assert len(expected) == 39


@pytest.mark.parametrize("query", QUERIES)
def test_the_untrained_reranker_takes_the_fused_scores_it_would_compute(hybrid: Matcher, query: str) -> None:
    """Hybrid retrieval hands its fused scores on with how they were fused; the untrained reranker returns them as
    they are where its fusion is the same, and they equal, bit for bit, what it computes from the parts."""
    snap = hybrid.snapshot
    vectors = snap.encode_queries([query])
    found = HybridRetriever().retrieve(snap, Queries(vectors, [query]), 40, None)
    assert found.fused == Fused(Fusion.ADAPTIVE, 1.0, 0.35, snap.scorer.centre, 15.0, 1.5)
    assert found.dense is not None
    assert found.lexical is not None
    keep = found.ids[0] >= 0
    parts = (found.ids[0][keep], found.scores[0][keep], found.dense[0][keep], found.lexical[0][keep])
    taken = ScorerReranker().rerank(snap, Hit(query, vectors[0], *parts, found.fused))
    computed = ScorerReranker().rerank(snap, Hit(query, vectors[0], *parts, None))
    assert taken is parts[1]
    assert np.array_equal(taken, computed)


def test_queries_encoded_aside_search_as_encoded_first(
    hybrid: Matcher, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """With torch on more than one thread, a hybrid search encodes its queries on a one-thread worker while BM25
    runs: the same vectors and answers as encoding first, the caller's thread count left alone, and the
    caller's deadline followed on the worker."""
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(2)  # as on any machine of 2 cores or more
    monkeypatch.setattr(overlap, "_ASIDE", None)  # workers made from this count, whatever ran before
    seen: list[str] = []
    encoder = hybrid.snapshot.query_encoder
    original = encoder.encode_queries

    def encode(queries: Any, **kwargs: Any) -> np.ndarray:
        seen.append(threading.current_thread().name)
        return original(queries, **kwargs)

    monkeypatch.setattr(encoder, "encode_queries", encode)
    aside = hybrid.search_batch(QUERIES, 5)
    assert len(seen) == 1
    assert seen[0].startswith("matching-encode")
    monkeypatch.setattr(overlap, "ENCODE_ASIDE", False)
    seen.clear()
    first = hybrid.search_batch(QUERIES, 5)
    assert seen == [threading.current_thread().name]
    assert [[(m.id, m.score) for m in hits] for hits in aside] == [[(m.id, m.score) for m in hits] for hits in first]
    monkeypatch.setattr(overlap, "ENCODE_ASIDE", True)
    seen.clear()
    hybrid.search_batch(QUERIES, 5, retrieval="dense")  # no words to search meanwhile: encoded here
    assert seen == [threading.current_thread().name]

    def slow(queries: Any, **kwargs: Any) -> np.ndarray:
        deadline.check()  # runs on the worker: it must see the caller's deadline
        time.sleep(0.05)
        deadline.check()
        return original(queries, **kwargs)

    monkeypatch.setattr(encoder, "encode_queries", slow)
    with deadline.within(0.02), pytest.raises(DeadlineError):
        hybrid.search("coffee")
    assert torch.get_num_threads() == 2  # the workers' one thread is theirs only
    assert overlap._ASIDE is not None
    assert overlap._ASIDE.submit(torch.get_num_threads).result() == 1
    started: list[int] = []
    later = threading.Thread(target=lambda: started.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert started == [2]  # a thread started after the workers still takes the process's default


def test_a_forked_child_encodes_aside_with_workers_of_its_own(hybrid: Matcher, request: pytest.FixtureRequest) -> None:
    """A process that forks after a search (multiprocessing, a preloading server) inherits the workers' pool but
    none of its threads: the child must start its own, not wait for ever."""
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(2)
    want = [m.id for m in hybrid.search("coffee")]
    assert overlap._ASIDE is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            torch.set_num_threads(2)
            vectors = overlap.encode_aside(hybrid.snapshot, ["coffee"]).result(timeout=60)
            os.write(write, json.dumps([overlap._ASIDE is not None, vectors.shape[0]]).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 90)
        assert ready, "the forked child did not answer in 90 s"
        assert json.loads(os.read(read, 1000)) == [True, 1]
    finally:
        os.close(read)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert [m.id for m in hybrid.search("coffee")] == want


def test_waiting_for_vectors_encoded_aside_keeps_the_deadline_and_a_failed_search_drops_them(
    hybrid: Matcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending: Future[np.ndarray] = Future()  # never done: a pool busy with other work
    with deadline.within(0.05), pytest.raises(DeadlineError):
        _ = Queries(pending, ["coffee"]).vectors
    assert pending.cancelled()

    pending = Future()
    snap, retriever = hybrid.snapshot, HybridRetriever()
    with pytest.raises(ConfigError, match="k must be"):
        search(snap, Queries(pending, ["coffee"]), 0, candidates=10, retriever=retriever, reranker=NoReranker())
    assert pending.cancelled()  # not encoded for nothing

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    want = [(m.id, m.score) for m in hybrid.search("coffee")]
    monkeypatch.setattr(overlap, "encode_aside", refused)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert [(m.id, m.score) for m in hybrid.search("coffee")] == want  # encoded here instead


def test_a_scorer_refuses_features_short_of_its_columns() -> None:
    """A scorer whose rule has a span takes six lexical columns (the lift last); five would read an empty lift."""
    config = ScorerConfig(dim=4, lexical=True, dense_floor=0.35, dense_span=15.0, fusion=Fusion.ADAPTIVE)
    scorer = Scorer(config)
    q, t = torch.ones(2, 4) / 2, torch.ones(2, 4) / 2
    lex = torch.zeros(2, 6)
    lex[:, 0] = torch.tensor([0.25, 0.5])  # the lexical share; known share 0: the words alone decide
    assert scorer(q, t, lex).tolist() == [0.25, 0.5]
    lex[:, 4] = 0.25  # a quarter read: w = 0.25 ** 1.5 = 0.125 at ratio 1, of the centred cosine 1
    lex[:, 3] = 1.0
    powered = Scorer(dataclasses.replace(config, known_power=1.5))
    assert powered(q, t, lex).tolist() == pytest.approx([0.125 + 0.875 * 0.25, 0.125 + 0.875 * 0.5])
    assert scorer(q, t, lex).tolist() == pytest.approx([0.25 + 0.75 * 0.25, 0.25 + 0.75 * 0.5])
    with pytest.raises(ValueError, match="6 lexical feature columns"):
        scorer(q, t, lex[:, :5])
    with pytest.raises(ValueError, match="6 lexical feature columns"):
        scorer(q, t)
