"""BM25 index and analysers, checked against a brute force written straight from the formula."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from matching.analysis import (
    FOLD,
    Analyzer,
    analyze,
    counted,
    fold_case,
    jieba_available,
    matched_spans,
    resolve_analyzer,
)
from matching.errors import BundleError, ConfigError
from matching.layout import LEXICAL_ARRAYS, LEXICAL_CONFIG
from matching.lexical import BM25Params, LexicalIndex

HAN = Analyzer.CHINESE_MIXED if jieba_available() else Analyzer.CHINESE_CHARS  # what 'auto' picks for Chinese

TITLES = [
    "Red running shoes for men",
    "Blue running shoes for women",
    "Red red dress with red belt",
    "Black leather belt",
    "Wireless headphones with noise cancelling",
    "Wired headphones",
    "Noise cancelling wireless earbuds",
    "Running socks, pack of 6",
    "Red wine glass set",
    "Stainless steel water bottle",
    "Water bottle for running",
    "Black running shoes",
    "Leather wallet for men",
    "Women's leather handbag black",
    "Steel kitchen knife set",
    "Kitchen knife sharpener",
    "USB-C charging cable 2m",
    "USB-C to USB-A adapter",
    "Phone case for iPhone 15",
    "iPhone 15 screen protector",
    "Yoga mat non-slip",
    "Yoga mat bag",
    "Red running shoes for men",
    "Coffee mug ceramic",
    "Ceramic coffee cup with saucer",
    "Espresso coffee beans 1kg",
    "Green tea bags",
    "无线蓝牙耳机",
    "无线耳机 降噪",
    "iPhone 15 手机壳 黑色",
    "黑色 皮带",
]
QUERIES = [
    "red running shoes",
    "red red shoes",
    "wireless noise cancelling headphones",
    "the black leather",
    "iphone 15 case",
    "coffee",
    "无线耳机",
    "黑色",
    "steel bottle water kitchen",
    "usb c cable",
]


def brute(
    query: str,
    corpus: list[str],
    analyzer: Analyzer,
    params: BM25Params,
    live: list[bool] | None = None,
    texts: list[str] | None = None,
) -> np.ndarray:
    """BM25 of ``query`` for each of ``texts`` (default: the corpus) with the statistics of the live corpus."""
    docs = [analyze(title, analyzer) for title in corpus]
    live = live if live is not None else [True] * len(docs)
    alive = [doc for doc, keep in zip(docs, live, strict=True) if keep]
    n, avgdl = len(alive), sum(map(len, alive)) / len(alive)
    targets = docs if texts is None else [analyze(text, analyzer) for text in texts]
    scores = np.zeros(len(targets))
    for term in set(analyze(query, analyzer)):
        df = sum(term in doc for doc in alive)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, doc in enumerate(targets):
            tf = doc.count(term)
            if tf and (texts is not None or live[i]):
                norm = params.k1 * (1 - params.b + params.b * len(doc) / avgdl)
                scores[i] += idf * tf * (params.k1 + 1) / (tf + norm)
    return scores


def expected_top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.flatnonzero(scores > 0)
    rows = rows[np.lexsort((rows, -scores[rows]))][:k]
    return scores[rows], rows


def check_search(index: LexicalIndex, corpus: list[str], live: list[bool] | None = None, k: int = 5) -> None:
    scores, ids = index.search(QUERIES, k)
    for i, query in enumerate(QUERIES):
        want = brute(query, corpus, index.analyzer, index.params, live)
        top_scores, top_rows = expected_top(want, k)
        assert ids[i, : len(top_rows)].tolist() == top_rows.tolist(), query
        np.testing.assert_allclose(scores[i, : len(top_rows)], top_scores, rtol=1e-5)
        assert (ids[i, len(top_rows) :] == -1).all()
        assert np.isneginf(scores[i, len(top_rows) :]).all()
        np.testing.assert_allclose(index.score_rows(query, np.arange(len(corpus))), want, rtol=1e-5)


@pytest.mark.skipif(not jieba_available(), reason="jieba (matching[cjk]) is not installed")
def test_the_mixed_analyser_matches_characters_where_jieba_cuts_words_apart(tmp_path: Path) -> None:
    corpus = ["信用卡年费", "招商银行信用卡", "储蓄卡挂失", "花呗怎么还款", "狂三高清图", "信用记录查询"]
    rows = np.arange(len(corpus))
    words = LexicalIndex.build(corpus, Analyzer.CHINESE)
    mixed = LexicalIndex.build(corpus, Analyzer.CHINESE_MIXED)
    # jieba keeps 信用卡 one word: by words only the rows holding it match; by characters 储蓄卡 and 信用记录 too
    assert np.flatnonzero(words.score_rows("信用卡", rows)).tolist() == [0, 1]
    got = mixed.score_rows("信用卡", rows)
    assert np.flatnonzero(got).tolist() == [0, 1, 2, 5]
    np.testing.assert_allclose(got, brute("信用卡", corpus, Analyzer.CHINESE_MIXED, BM25Params()), rtol=1e-5)
    # a one-character word and that character are two terms
    assert analyze("花呗", Analyzer.CHINESE_MIXED) == ["花", "呗", "_花", "_呗"]
    # the fusion's length features count words only: 信用卡 年 费 (not its five characters as well)
    assert mixed.distinct_count("信用卡年费") == 3
    want = [len({t for t in analyze(title, Analyzer.CHINESE_MIXED) if not t.startswith("_")}) for title in corpus]
    assert mixed.distinct_terms(rows).tolist() == [mixed.distinct_count(title) for title in corpus] == want
    # and so through a change, compaction and a reload
    mixed.remove(np.array([1, 4]))
    mixed.add(np.array([7, 8]), ["信用卡积分兑换", "花呗"])
    live = {0: corpus[0], 2: corpus[2], 3: corpus[3], 5: corpus[5], 7: "信用卡积分兑换", 8: "花呗"}
    counts = [mixed.distinct_count(title) for title in live.values()]
    assert counts[-2:] == [len(counted(analyze("信用卡积分兑换", Analyzer.CHINESE_MIXED))), 2]
    assert mixed.distinct_terms(np.array(list(live))).tolist() == counts
    mixed.save(tmp_path)
    assert LexicalIndex.load(tmp_path).distinct_terms(np.array(list(live))).tolist() == counts
    assert mixed.compacted().distinct_terms(np.arange(len(live))).tolist() == counts


def test_analyzers() -> None:
    assert analyze("Running shoes for the runners", Analyzer.ENGLISH) == ["run", "shoe", "runner"]
    assert analyze("Running shoes for the runners", Analyzer.STANDARD) == ["running", "shoes", "for", "the", "runners"]
    assert analyze("Ｔ－Ｓｈｉｒｔ, XL_size", Analyzer.STANDARD) == ["t", "shirt", "xl", "size"]
    grams = analyze("无线耳机", Analyzer.CJK)
    assert sorted(grams) == sorted(["无", "线", "耳", "机", "无线", "线耳", "耳机"])
    for analyzer in (Analyzer.STANDARD, Analyzer.ENGLISH, Analyzer.CJK):
        assert analyze("无线耳机", analyzer) == grams
    assert analyze("iPhone 手机壳", Analyzer.CJK) == ["iphon", "手", "手机", "机", "机壳", "壳"]
    assert analyze("iPhone 手机壳", Analyzer.STANDARD) == ["iphone", "手", "手机", "机", "机壳", "壳"]
    assert analyze("हिन्दी किताब", Analyzer.STANDARD) == ["हिन्दी", "किताब"]  # vowel signs stay in the word
    assert resolve_analyzer(["无线蓝牙耳机", "iPhone 15 手机壳 黑色", "USB cable"]) == HAN
    assert resolve_analyzer([*TITLES[:10], "iPhone 15 手机壳"]) == Analyzer.ENGLISH  # 3 CJK of 300 letters
    with pytest.raises(ConfigError, match="resolve_analyzer"):
        analyze("shoes", Analyzer.AUTO)
    with pytest.raises(ConfigError, match="k1"):
        BM25Params(k1=-1)


@pytest.mark.parametrize(
    ("analyzer", "params"), [(Analyzer.ENGLISH, BM25Params()), (Analyzer.STANDARD, BM25Params(k1=2.0, b=0.3))]
)
def test_search_and_scores_equal_brute_force(analyzer: Analyzer, params: BM25Params) -> None:
    index = LexicalIndex.build(TITLES, analyzer, params)
    check_search(index, TITLES, k=5)
    check_search(index, TITLES, k=40)  # fewer matches than k: padded
    texts = [*TITLES[:3], "red kettle with a whistle", "完全未知的标题", ""]
    for query in [*QUERIES, "kettle red zzz"]:
        want = brute(query, TITLES, analyzer, params, texts=texts)  # "kettle" and "zzz" have df 0
        np.testing.assert_allclose(index.score_texts(query, texts), want, rtol=1e-5)
        np.testing.assert_array_equal(index.score_texts(query, TITLES), index.score_rows(query, np.arange(len(TITLES))))
        bound = index.max_score(query)
        assert bound > 0
        assert np.all(index.score_texts(query, [*TITLES, *texts]) <= bound)


def test_auto_resolves_and_mask_filters() -> None:
    assert LexicalIndex.build(TITLES[-4:], Analyzer.AUTO).analyzer == HAN
    index = LexicalIndex.build(TITLES, Analyzer.AUTO)
    assert index.analyzer == Analyzer.ENGLISH
    allowed = np.zeros(len(TITLES), dtype=bool)
    allowed[[1, 11, 22]] = True
    scores, ids = index.search(["red running shoes", "yoga"], 3, allowed)
    assert ids.tolist() == [[22, 11, 1], [-1, -1, -1]]  # 11 and 1 lack "red"; 11 is the shorter title
    assert scores[0, 0] > scores[0, 1] > 0
    assert np.isneginf(scores[1]).all()
    scores, ids = index.search(["zzz qqq", "", "the for with"], 4)
    assert (ids == -1).all()
    assert np.isneginf(scores).all()
    assert index.query_terms("zzz").size == 0
    assert index.search(["red"], 0)[1].shape == (1, 0)


def test_ties_go_to_the_lower_row() -> None:
    index = LexicalIndex.build(["red shoes", "blue shoes", "red shoes", "red shoes"], Analyzer.ENGLISH)
    scores, ids = index.search(["red shoes"], 2)
    assert ids.tolist() == [[0, 2]]
    assert scores[0, 0] == scores[0, 1]


def test_add_remove_compact_equal_fresh_builds() -> None:
    index = LexicalIndex.build(TITLES[:20], Analyzer.ENGLISH)
    index.add(np.arange(20, len(TITLES)), TITLES[20:])
    index.remove(np.array([0, 3, 27, 30]))
    index.remove(np.array([3]))  # again: no change
    live = [i not in {0, 3, 27, 30} for i in range(len(TITLES))]
    survivors = [(i, t) for i, t in enumerate(TITLES) if live[i]]
    fresh = LexicalIndex.build(survivors, Analyzer.ENGLISH, rows=len(TITLES))
    assert index.equals(fresh)
    assert fresh.equals(index)
    assert (index.rows, index.count) == (len(TITLES), len(survivors))
    assert not index.equals(LexicalIndex.build(TITLES, Analyzer.ENGLISH))
    check_search(index, TITLES, live, k=5)
    check_search(fresh, TITLES, live, k=5)
    dead = np.array([0, 3, 27, 30])
    assert (index.score_rows("red running shoes black", dead) == 0).all()
    assert not np.isin(index.search(QUERIES, len(TITLES))[1], dead).any()

    compact = index.compacted()
    assert compact.equals(LexicalIndex.build([t for _, t in survivors], Analyzer.ENGLISH))
    renumber = np.cumsum(live) - 1
    full_scores, full_ids = index.search(QUERIES, 8)
    scores, ids = compact.search(QUERIES, 8)
    np.testing.assert_array_equal(scores, full_scores)
    np.testing.assert_array_equal(ids, np.where(full_ids >= 0, renumber[full_ids], -1))

    index.add(np.array([33, 34]), ["red running shoes", "Green tea bags"])  # rows 31 and 32 stay dead
    assert (index.rows, index.count) == (35, len(survivors) + 2)
    assert index.search(["green tea"], 3)[1][0].tolist() == [26, 34, -1]
    with pytest.raises(ValueError, match="ascend"):
        index.add(np.array([10]), ["again"])


@pytest.mark.parametrize("filtered", [False, True])
def test_pruned_search_equals_exhaustive_ranking(filtered: bool) -> None:
    rng = np.random.default_rng(7)
    words = [f"w{i}" for i in range(60)]
    weights = 1 / np.arange(1, 61) ** 1.1  # a few very common words, many rare ones
    titles = [" ".join(rng.choice(words, rng.integers(2, 9), p=weights / weights.sum())) for _ in range(3000)]
    titles += titles[:400]  # ties: the same title under two rows
    index = LexicalIndex.build(titles, Analyzer.STANDARD)
    index.remove(rng.choice(len(titles), 300, replace=False))
    allowed = rng.random(len(titles)) < 0.3 if filtered else None
    queries = [" ".join(rng.choice(words, rng.integers(1, 7))) for _ in range(80)]
    for k in (1, 10, 50, 400):
        scores, ids = index.search(queries, k, allowed)
        for i, query in enumerate(queries):
            every = index.score_rows(query, np.arange(len(titles)))
            if allowed is not None:
                every[~allowed] = 0
            want_scores, want_rows = expected_top(every.astype(np.float64), k)
            assert ids[i, : len(want_rows)].tolist() == want_rows.tolist(), (query, k)
            np.testing.assert_array_equal(scores[i, : len(want_rows)], want_scores.astype(np.float32))
            assert (ids[i, len(want_rows) :] == -1).all()
        index.pruning = False
        np.testing.assert_array_equal(index.search(queries, k, allowed)[1], ids)
        index.pruning = True


@pytest.mark.parametrize(
    "analyzer",
    [
        Analyzer.CHINESE_CHARS,
        pytest.param(
            Analyzer.CHINESE_MIXED,
            marks=pytest.mark.skipif(not jieba_available(), reason="jieba (matching[cjk]) is not installed"),
        ),
    ],
    ids=str,
)
def test_pruned_search_equals_exhaustive_ranking_over_chinese_words_and_characters(analyzer: Analyzer) -> None:
    # long character lists against few rows that can reach the top k: the rows met are sifted and the lists left
    # searched row by row (BM25Index._add_to)
    rng = np.random.default_rng(3)
    words = [
        "信用卡",
        "花呗",
        "还款",
        "怎么",
        "可以",
        "银行",
        "借呗",
        "额度",
        "提前",
        "逾期",
        "利息",
        "账单",
        "分期",
        "开通",
        "为什么",
        "不能",
        "用",
        "的",
        "了",
        "吗",
    ]
    weights = 1 / np.arange(1, len(words) + 1) ** 0.8
    titles = ["".join(rng.choice(words, rng.integers(2, 8), p=weights / weights.sum())) for _ in range(4000)]
    index = LexicalIndex.build(titles, analyzer)
    index.remove(rng.choice(len(titles), 200, replace=False))
    queries = ["".join(rng.choice(words, rng.integers(1, 6))) for _ in range(60)]
    every = np.stack([index.score_rows(query, np.arange(len(titles))) for query in queries]).astype(np.float64)
    for k in (1, 10, 100):
        scores, ids = index.search(queries, k)
        for i, query in enumerate(queries):
            want_scores, want_rows = expected_top(every[i], k)
            assert ids[i, : len(want_rows)].tolist() == want_rows.tolist(), (query, k)
            np.testing.assert_array_equal(scores[i, : len(want_rows)], want_scores.astype(np.float32))


ANALYZERS = [
    Analyzer.STANDARD,
    Analyzer.ENGLISH,
    Analyzer.CJK,
    Analyzer.CHINESE_CHARS,
    *([Analyzer.CHINESE, Analyzer.CHINESE_MIXED] if jieba_available() else []),
]
FOLDED = [
    ("İstanbul", "istanbul", ["istanbul"]),  # Turkish capital dotted I: no U+0307 left behind
    ("İSTANBUL", "istanbul", ["istanbul"]),
    ("KIRMIZI", "kırmızı", ["kirmizi"]),  # Turkish dotless ı and its capital I
    ("Straße", "STRASSE", ["strasse"]),  # German sharp s folds to ss
    ("ẞ", "ss", ["ss"]),  # capital sharp s
    ("ＡＢＣ", "abc", ["abc"]),  # full-width Latin
    ("ﬁle", "FILE", ["file"]),  # a ligature
    ("Cafe\u0301", "café", ["café"]),  # a combining acute composes with its letter
]


@pytest.mark.parametrize(("text", "same", "terms"), FOLDED, ids=[t for t, _, _ in FOLDED])
@pytest.mark.parametrize("analyzer", ANALYZERS, ids=str)
def test_case_folding_follows_unicode_in_every_analyzer(
    analyzer: Analyzer, text: str, same: str, terms: list[str]
) -> None:
    assert fold_case(text) == fold_case(same)
    assert analyze(text, Analyzer.STANDARD) == terms
    assert analyze(text, analyzer) == analyze(same, analyzer) != []
    assert matched_spans(same, f"{text} x", analyzer) == [(0, len(text))]
    assert matched_spans(text, f"x {same}", analyzer) == [(2, 2 + len(same))]
    index = LexicalIndex.build(["blue lamp", f"{text} lamp", "red lamp"], analyzer)
    assert index.search([same], 3)[1][0].tolist() == [1, -1, -1]


def test_an_index_keeps_the_case_folding_it_was_built_with(tmp_path: Path) -> None:
    """A saved index from before the folding was recorded keeps NFKC + casefold (its stored terms hold the
    U+0307 of a lowered İ), so every query that found a title still finds it, and titles added later fold alike."""
    old = LexicalIndex.build(["İstanbul halı", "Ankara halı"], Analyzer.ENGLISH, fold=1)
    assert old.fold == 1
    old.save(tmp_path)
    meta = json.loads((tmp_path / LEXICAL_CONFIG).read_text(encoding="utf-8"))
    assert meta["fold"] == 1
    del meta["fold"]  # as an index saved before the folding was recorded
    (tmp_path / LEXICAL_CONFIG).write_text(json.dumps(meta), encoding="utf-8")
    loaded = LexicalIndex.load(tmp_path)
    assert loaded.fold == 1
    assert loaded.search(["İstanbul"], 1)[1].tolist() == [[0]]  # as before
    assert loaded.search(["istanbul"], 1)[1].tolist() == [[-1]]  # as before: only a rebuild folds it
    loaded.add(np.array([2]), ["İzmir halı"])
    assert loaded.search(["İzmir"], 1)[1].tolist() == [[2]]
    assert loaded.compacted().fold == 1
    new = LexicalIndex.build(["İstanbul halı", "Ankara halı"], Analyzer.ENGLISH)
    assert new.fold == FOLD == 2
    assert new.search(["istanbul", "İSTANBUL"], 1)[1].tolist() == [[0], [0]]
    assert not new.equals(LexicalIndex.build(["İstanbul halı", "Ankara halı"], Analyzer.ENGLISH, fold=1))
    for text in [*TITLES, "Straße ＡＢＣ café", "Cafe\u0301 ﬁle", "हिन्दी किताब", "iPhone 手机壳"]:  # no ı, İ or i̇
        assert analyze(text, Analyzer.STANDARD, 1) == analyze(text, Analyzer.STANDARD), text


def test_save_load_round_trip(tmp_path: Path) -> None:
    index = LexicalIndex.build(TITLES, Analyzer.CJK, BM25Params(k1=1.5, b=0.5))
    index.remove(np.array([2, 28]))
    index.save(tmp_path)
    loaded = LexicalIndex.load(tmp_path)
    assert loaded.equals(index)
    assert (loaded.analyzer, loaded.params) == (Analyzer.CJK, BM25Params(1.5, 0.5))
    for got, want in zip(loaded.search(QUERIES, 6), index.search(QUERIES, 6), strict=True):
        np.testing.assert_array_equal(got, want)
    loaded.add(np.array([len(TITLES)]), ["red wine"])  # a loaded index still changes
    assert loaded.search(["wine"], 2)[1].tolist() == [[31, 8]]


def _damage_json(directory: Path, **changes: object) -> None:
    meta = json.loads((directory / LEXICAL_CONFIG).read_text(encoding="utf-8"))
    (directory / LEXICAL_CONFIG).write_text(json.dumps({**meta, **changes}), encoding="utf-8")


def _damage_arrays(directory: Path, name: str, cut: int) -> None:
    arrays = load_file(str(directory / LEXICAL_ARRAYS))
    save_file({**arrays, name: arrays[name][:cut]}, str(directory / LEXICAL_ARRAYS))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / LEXICAL_ARRAYS).unlink(), "missing"),
        (lambda d: (d / LEXICAL_CONFIG).write_text("{not json", encoding="utf-8"), "cannot read"),
        (lambda d: (d / LEXICAL_ARRAYS).write_bytes(b"\x00" * 40), "cannot read"),
        (lambda d: _damage_json(d, analyzer="klingon"), "analyzer"),
        (lambda d: _damage_json(d, format="faiss"), "not a lexical index"),
        (lambda d: _damage_json(d, version=99), "version"),
        (lambda d: _damage_json(d, fold=7), "case folding 7"),
        (lambda d: _damage_json(d, rows=5), "lengths"),
        (lambda d: _damage_arrays(d, "post_tf", -1), "lengths"),
        (lambda d: _damage_arrays(d, "ptr", -1), "pointers"),
    ],
)
def test_load_rejects_damaged_files(tmp_path: Path, damage: object, message: str) -> None:
    LexicalIndex.build(TITLES, Analyzer.ENGLISH).save(tmp_path)
    damage(tmp_path)  # type: ignore[operator]
    with pytest.raises(BundleError, match=message):
        LexicalIndex.load(tmp_path)
