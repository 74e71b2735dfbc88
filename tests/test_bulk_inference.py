"""The bulk inference copy: short-text attention and packed linear layers, against direct computations."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from matching import accel, attention, packed
from matching.config import EncoderConfig
from matching.encoder import Encoder
from matching.types import Preset

TITLES = [
    "Acme black wireless headphones",
    "red running shoes",
    "a stainless steel coffee maker with a glass kettle and a timer",
    "yoga mat",
    "Globex silver gaming laptop 16 inch with a backlit keyboard and a very long name that goes on and on "
    "for more than thirty two tokens of the tiny vocabulary",
    "x",
]


def _direct(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T scale, masked) v in float64, as (batch, tokens, heads, head_dim)."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", weights, v.double()).transpose(1, 2)


@pytest.mark.parametrize("tokens", [1, 5, 15, 16, 31, 32, 40])  # narrow softmax, wide softmax, torch's kernel
@pytest.mark.parametrize("mask", ["additive", "boolean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_short_attention_equals_the_formula(tokens: int, mask: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(3, 2, tokens, 8, generator=g).to(dtype) for _ in range(3))
    lengths = torch.tensor([tokens, max(1, tokens // 2), 1])
    keep = (torch.arange(tokens)[None, :] < lengths[:, None])[:, None, None, :].expand(3, 1, tokens, tokens)
    if mask == "none":
        keep = torch.ones_like(keep)
        given = None
    elif mask == "boolean":
        given = keep
    else:
        given = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    module = nn.Module().eval()
    got, weights = attention.short_attention(module, q, k, v, given, scaling=0.3)
    assert weights is None
    assert got.dtype == dtype
    # bfloat16: the scores and the output are rounded (3 significant digits), the softmax is not
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), _direct(q, k, v, keep, 0.3), atol=tolerance, rtol=tolerance)


def test_fewer_key_than_query_heads_take_torchs_kernel() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(2))
    got, _ = attention.short_attention(nn.Module().eval(), q, k, v, None, scaling=0.3)
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    want = _direct(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), keep, 0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_the_narrow_softmax_equals_torchs() -> None:
    x = torch.randn(4, 3, 7, 7, generator=torch.Generator().manual_seed(1)) * 30
    torch.testing.assert_close(attention.softmax_last(x.clone()), torch.softmax(x, -1), atol=1e-6, rtol=1e-6)


def test_short_attention_refuses_training_with_dropout() -> None:
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="inference only"):
        attention.short_attention(nn.Module().train(), q, q, q, None, dropout=0.1)


@pytest.mark.skipif(not accel.cpu_has_native_bf16(), reason="the bulk copy runs on CPUs with native bfloat16")
def test_the_bulk_copy_hands_its_attention_the_padding_mask(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.Tensor | None] = []
    original = attention.short_attention

    def spy(
        module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any
    ) -> Any:
        seen.append(mask)
        return original(module, query, key, value, mask, **kw)

    monkeypatch.setattr(attention, "short_attention", spy)  # what _register hands transformers
    monkeypatch.setattr(accel, "BULK_MIN_TOKENS", 40)
    encoder = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), preset=Preset.DEFAULT))
    lengths = [len(ids) for ids in encoder.tokenizer(TITLES[:4])["input_ids"]]
    encoder.encode(TITLES[:4])  # one padded batch of four widths
    assert seen
    assert all(isinstance(m, torch.Tensor) for m in seen)
    mask = seen[0]
    assert isinstance(mask, torch.Tensor)
    assert mask.shape == (4, 1, max(lengths), max(lengths))
    hidden = mask[:, 0, 0, :] < -1e30 if mask.dtype != torch.bool else ~mask[:, 0, 0, :]
    # rows in the encoder's order (longest first): each hides exactly its padding
    assert sorted(int(h.sum()) for h in hidden) == sorted(max(lengths) - n for n in lengths)


def _bf16_ops() -> bool:
    return accel.cpu_has_native_bf16()


@pytest.mark.skipif(not _bf16_ops(), reason="oneDNN bfloat16 needs a CPU with native bfloat16")
def test_packed_layers_give_the_models_answer(tiny_encoder: Encoder) -> None:
    model = copy.deepcopy(tiny_encoder.model).eval().to(torch.bfloat16)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    want_model = copy.deepcopy(model)
    assert packed.pack_linears(model) == linears
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    batch = tiny_encoder.tokenize(TITLES)
    with torch.inference_mode():
        got = model(**batch).last_hidden_state.float()
        want = want_model(**batch).last_hidden_state.float()
    # bfloat16 keeps ~3 significant digits; the fused GELU rounds once less than GELU after the layer
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)
    assert float((got - want).abs().mean()) < 0.01


def test_nothing_is_packed_outside_bfloat16_on_a_cpu(tiny_encoder: Encoder) -> None:
    model = copy.deepcopy(tiny_encoder.model).eval()
    assert packed.pack_linears(model) == 0
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) > 0


def test_packing_is_skipped_where_the_ops_are_missing(tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: Any) -> Any:
        raise RuntimeError("no such op")

    monkeypatch.setattr(packed.PackedLinear, "forward", missing)
    model = copy.deepcopy(tiny_encoder.model).eval().to(torch.bfloat16)
    if not _bf16_ops():
        pytest.skip("oneDNN bfloat16 needs a CPU with native bfloat16")
    assert packed.pack_linears(model) == 0
    assert not any(isinstance(m, packed.PackedLinear) for m in model.modules())


@pytest.mark.skipif(not _bf16_ops(), reason="the bulk copy runs on CPUs with native bfloat16")
def test_big_batches_run_the_bulk_copy_close_to_exact(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: Any
) -> None:
    monkeypatch.setattr(accel, "BULK_MIN_TOKENS", 40)  # the titles as one batch are bulk, alone not
    config = EncoderConfig(model=str(tiny_model_dir), preset=Preset.DEFAULT, device="cpu")
    encoder = Encoder.from_pretrained(config)
    queries = encoder.encode_queries(TITLES)  # big enough, but queries never run on the bulk copy
    assert isinstance(encoder._runner, accel.WithBulk)
    assert set(encoder._runner._built) == {True}
    np.testing.assert_array_equal(queries, np.stack([encoder.encode_queries([t])[0] for t in TITLES]))
    exact = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), preset=Preset.EXACT))
    short = [t for t in TITLES if len(encoder.tokenize([t])["input_ids"][0]) < attention.SHORT_MAX_TOKENS]
    assert len(short) == len(TITLES) - 1
    for titles in (short, TITLES):  # the multiplied-out attention, then torch's for the long title's width
        together = encoder.encode(titles)
        alone = np.stack([encoder.encode([t])[0] for t in titles])
        assert np.sum(together * exact.encode(titles), axis=1).min() > 0.99
        np.testing.assert_allclose(together, alone, atol=2e-2, rtol=0)
    runner = encoder._runner
    assert isinstance(runner, accel.BySize)
    assert set(runner._built) == {True, False}  # both copies ran
    bulk = runner._built[False]
    assert isinstance(bulk, accel.Pooled)
    assert bulk.model.config._attn_implementation == attention.NAME
    assert any(isinstance(m, packed.PackedLinear) for m in bulk.modules())
    # the encoder's own model keeps its attention and its float32 layers (training and saving use it)
    assert encoder.model.config._attn_implementation != attention.NAME
    assert not any(isinstance(m, packed.PackedLinear) for m in encoder.model.modules())


ARCHITECTURES = {
    "distilbert": ("DistilBertConfig", {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}),
    "roberta": ("RobertaConfig", {"max_position_embeddings": 130, "pad_token_id": 0}),
    "albert": ("AlbertConfig", {"embedding_size": 16}),
    "mpnet": ("MPNetConfig", {"max_position_embeddings": 130, "pad_token_id": 0}),  # takes no attention function
}


@pytest.mark.skipif(not _bf16_ops(), reason="the bulk copy runs on CPUs with native bfloat16")
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_the_bulk_copy_of_other_bert_family_checkpoints_stays_close_to_exact(
    architecture: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import transformers

    name, settings = ARCHITECTURES[architecture]
    directory = tmp_path / architecture
    shutil.copytree(tiny_model_dir, directory)  # the tokenizer; the model is replaced
    for file in ("model.safetensors", "config.json"):
        (directory / file).unlink()
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    vocab = len((directory / "vocab.txt").read_text(encoding="utf-8").splitlines())
    config = getattr(transformers, name)(
        vocab_size=vocab, **({} if architecture == "distilbert" else sizes), **settings
    )
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(directory, safe_serialization=True)
    monkeypatch.setattr(accel, "BULK_MIN_TOKENS", 40)
    texts = TITLES[:4] * 3
    exact = Encoder.from_pretrained(EncoderConfig(model=str(directory), preset=Preset.EXACT)).encode(texts)
    encoder = Encoder.from_pretrained(EncoderConfig(model=str(directory), preset=Preset.DEFAULT))
    vectors = encoder.encode(texts)
    assert isinstance(encoder._runner, accel.WithBulk)
    bulk = encoder._runner._built[False]
    switched = bulk.model.config._attn_implementation == attention.NAME
    assert switched is (architecture != "mpnet")
    assert any(isinstance(m, packed.PackedLinear) for m in bulk.modules())
    assert np.sum(vectors * exact, axis=1).min() > 0.999


@pytest.mark.minilm
@pytest.mark.skipif(not _bf16_ops(), reason="the bulk copy runs on CPUs with native bfloat16")
def test_minilms_bulk_copy_stays_within_a_rounding_of_exact() -> None:
    from matching.demo import generate_catalogue

    titles = generate_catalogue(400)["title"].tolist()
    longer = (f"{t}, {u} and more of the same for a longer text" for t, u in itertools.pairwise(titles))
    texts = [*titles, *longer]
    exact = Encoder.from_pretrained(EncoderConfig(preset=Preset.EXACT)).encode(texts)
    encoder = Encoder.from_pretrained(EncoderConfig(preset=Preset.DEFAULT))
    bulk = encoder.encode(texts)  # batches of ~4,096 padded tokens, widths on both sides of SHORT_MAX_TOKENS
    assert set(encoder._runner._built) >= {False}
    alone = encoder.encode_queries(texts[::40])  # the traced copy
    assert np.sum(bulk * exact, axis=1).min() > 0.9999
    np.testing.assert_allclose(bulk[::40], alone, atol=5e-3, rtol=0)
