"""The BERT tower on a tiny random checkpoint: shapes, normalisation, pooling, fingerprints, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from matching.config import EncoderConfig
from matching.encoder import QUERY_PAD_MULTIPLE, Encoder, pick_device
from matching.errors import ModelError
from matching.types import Pooling

TEXTS = [
    "red running shoes",
    "a",
    "Acme black wireless headphones with noise cancelling and a 30 hour battery life for travel",
    "coffee maker",
    "the man is eating bread in the park on a warm sunny day",
    "usb-c cable 2m",
    "Café crème, 12 pack!",
    "yoga mat",
    "blue water bottle stainless steel",
    "desk lamp",
]


def test_vectors_are_float32_unit_rows(tiny_encoder: Encoder) -> None:
    vectors = tiny_encoder.encode(TEXTS)
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(vectors).all()


def test_dim_and_defaults_of_a_checkpoint_without_sentence_transformers_files(tiny_encoder: Encoder) -> None:
    assert tiny_encoder.dim == 32
    assert tiny_encoder.pooling is Pooling.MEAN
    assert tiny_encoder.max_length == 128  # capped by max_position_embeddings
    assert tiny_encoder.device.type == pick_device(None).type  # CUDA where there is one


def test_different_texts_get_different_vectors(tiny_encoder: Encoder) -> None:
    vectors = tiny_encoder.encode(["red running shoes", "coffee maker"])
    assert float(vectors[0] @ vectors[1]) < 0.999


@pytest.mark.parametrize("batch_size", [1, 3, 64], ids=lambda b: f"batch-{b}")
def test_results_do_not_depend_on_batch_size(tiny_encoder: Encoder, batch_size: int) -> None:
    reference = np.stack([tiny_encoder.encode([t])[0] for t in TEXTS])
    vectors = tiny_encoder.encode(TEXTS, batch_size=batch_size)
    np.testing.assert_allclose(vectors, reference, atol=1e-5, rtol=0)


def test_results_do_not_depend_on_input_order(tiny_encoder: Encoder) -> None:
    reference = tiny_encoder.encode(TEXTS, batch_size=3)
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = tiny_encoder.encode([TEXTS[i] for i in perm], batch_size=3)
    np.testing.assert_allclose(shuffled, reference[perm], atol=1e-5, rtol=0)


def test_query_and_title_towers_share_the_encoder(tiny_encoder: Encoder) -> None:
    # queries are padded to a multiple of QUERY_PAD_MULTIPLE tokens, titles not: the same up to float sums' order
    np.testing.assert_allclose(tiny_encoder.encode_queries(TEXTS), tiny_encoder.encode_titles(TEXTS), atol=1e-6)


def test_no_progress_bar_object_unless_shown(tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without progress, encoding makes no tqdm bar at all (a disabled one starts tqdm's monitor thread, which a
    forked child can find holding tqdm's lock: matching.progress); with progress, one bar counts every text."""
    from matching import progress

    made: list[Any] = []

    class Bar:
        def __init__(self, **kwargs: Any) -> None:
            self.n = 0
            made.append(self)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: int) -> None:
            self.n += n

    monkeypatch.setattr(progress, "tqdm", Bar)
    quiet = tiny_encoder.encode(TEXTS, batch_size=2)
    assert made == []
    shown = tiny_encoder.encode(TEXTS, show_progress=True, batch_size=2)
    assert len(made) == 1
    assert made[0].n == len(TEXTS)
    np.testing.assert_array_equal(shown, quiet)
    items = [1, 2, 3]
    assert progress.each(items, False) is items  # an iterable passes through bare
    assert len(made) == 1


def test_a_query_encodes_alike_alone_and_in_any_batch(tiny_encoder: Encoder) -> None:
    """Padded to a multiple of 16 tokens, each query's vector alone equals its row in a batch of queries of other
    lengths (to 1e-7 in float32 here; bit for bit with the real model: tests/test_minilm.py)."""
    assert QUERY_PAD_MULTIPLE == 16
    texts = [*TEXTS, "a much longer query about red running shoes for the road " * 3]
    batch = tiny_encoder.encode_queries(texts)
    alone = np.stack([tiny_encoder.encode_queries([t])[0] for t in texts])
    np.testing.assert_allclose(batch, alone, atol=1e-7, rtol=0)
    assert len({len(ids) for ids in tiny_encoder.tokenizer(texts)["input_ids"]}) > 2  # lengths differ


def test_a_query_batch_holds_queries_of_one_padded_width(
    tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries of 3 to ~40 tokens in batches of 8: every batch the runner sees is as wide as each of its queries
    would be alone (its length rounded up to 16); titles batch across widths."""
    texts = [("word " * n).strip() for n in range(1, 40, 3)]
    seen: list[list[int]] = []
    padded = tiny_encoder._host_padded

    def spy(rows: list[list[int]], multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
        seen.append([len(r) for r in rows])
        return padded(rows, multiple)

    monkeypatch.setattr(tiny_encoder, "_host_padded", spy)
    tiny_encoder.encode_queries(texts, batch_size=8)
    assert sum(map(len, seen)) == len(texts)
    assert len(seen) > 2
    for lengths in seen:
        assert len({-(-n // QUERY_PAD_MULTIPLE) for n in lengths}) == 1
    seen.clear()
    tiny_encoder.encode_titles(texts, batch_size=8)
    assert any(len({-(-n // QUERY_PAD_MULTIPLE) for n in lengths}) > 1 for lengths in seen)


def _raw_hidden(encoder: Encoder, text: str) -> torch.Tensor:
    batch = encoder.tokenizer([text], return_tensors="pt")
    assert int(batch["attention_mask"].sum()) == batch["input_ids"].shape[1]  # unpadded
    with torch.inference_mode():
        return encoder.model(**batch.to(encoder.device)).last_hidden_state[0].cpu()


def test_mean_pooling_equals_a_hand_computation(tiny_encoder: Encoder) -> None:
    text = "Acme black wireless headphones"
    hidden = _raw_hidden(tiny_encoder, text).numpy().astype(np.float64)
    assert hidden.shape[0] == 6  # [CLS] + 4 words + [SEP]: every token counts in the mean
    expected = hidden.mean(axis=0)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(tiny_encoder.encode([text])[0], expected, atol=1e-5, rtol=0)


def test_mean_pooling_ignores_padding(tiny_encoder: Encoder) -> None:
    short = "yoga mat"
    alone = tiny_encoder.encode([short])[0]
    padded = tiny_encoder.encode([short, "a much longer title that forces padding of the short one"])[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5, rtol=0)


def test_cls_pooling_equals_the_first_hidden_state(tiny_model_dir: Path) -> None:
    encoder = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), pooling=Pooling.CLS, preset="exact"))
    assert encoder.pooling is Pooling.CLS
    text = "blue water bottle"
    cls = _raw_hidden(encoder, text)[0].numpy().astype(np.float64)
    expected = cls / np.linalg.norm(cls)
    np.testing.assert_allclose(encoder.encode([text])[0], expected, atol=1e-5, rtol=0)


def test_max_length_truncates(tiny_model_dir: Path) -> None:
    encoder = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), max_length=4))
    assert encoder.max_length == 4
    a, b = encoder.encode(["red running shoes", "red running shoes and many more words after them"])
    # With 4 tokens both are [CLS] red running [SEP].
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_fingerprint_is_stable_across_loads(tiny_model_dir: Path, tiny_encoder: Encoder) -> None:
    again = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir)))
    assert again.fingerprint == tiny_encoder.fingerprint
    assert len(tiny_encoder.fingerprint) == 64
    int(tiny_encoder.fingerprint, 16)


def test_fingerprint_changes_with_pooling(tiny_model_dir: Path, tiny_encoder: Encoder) -> None:
    cls = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), pooling=Pooling.CLS))
    assert cls.fingerprint != tiny_encoder.fingerprint


def test_fingerprint_changes_with_weights(other_model_dir: Path, tiny_encoder: Encoder) -> None:
    other = Encoder.from_pretrained(EncoderConfig(model=str(other_model_dir)))
    assert other.fingerprint != tiny_encoder.fingerprint


def test_config_records_the_resolved_settings(tiny_model_dir: Path, tiny_encoder: Encoder) -> None:
    config = tiny_encoder.config()
    assert config.model == str(tiny_model_dir.resolve())
    assert config.pooling is Pooling.MEAN
    assert config.max_length == 128
    assert config.batch_size == 64


@pytest.mark.parametrize("texts", [[], ()], ids=["list", "tuple"])
def test_empty_input_gives_an_empty_array(tiny_encoder: Encoder, texts: Any) -> None:
    out = tiny_encoder.encode(texts)
    assert out.shape == (0, 32)
    assert out.dtype == np.float32


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "no-such-model"


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a model")
    return path


def _no_config(tmp_path: Path) -> Path:
    path = tmp_path / "empty-model"
    path.mkdir()
    (path / "vocab.txt").write_text("[PAD]\n", encoding="utf-8")
    return path


def _gpt2(tmp_path: Path) -> Path:
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}), encoding="utf-8")
    return path


def _bad_json(tmp_path: Path) -> Path:
    path = tmp_path / "bad-json"
    path.mkdir()
    (path / "config.json").write_text("{not json", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        pytest.param(_missing, "does not exist", id="missing-dir"),
        pytest.param(_a_file, "is a file", id="file-path"),
        pytest.param(_no_config, "no config.json", id="no-config-json"),
        pytest.param(_gpt2, "'gpt2'", id="gpt2-checkpoint"),
        pytest.param(_bad_json, "not valid JSON", id="config-not-json"),
    ],
)
def test_unusable_model_paths_are_model_errors(tmp_path: Path, make: Any, needle: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ModelError, match=needle) as info:
        Encoder.from_pretrained(EncoderConfig(model=str(path)))
    assert str(path) in str(info.value)
