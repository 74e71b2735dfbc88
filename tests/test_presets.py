"""Encoder presets: exact/default/fast share one vector space, fingerprint and config round-trip."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from matching import accel
from matching.accel import Plan, plan_for
from matching.config import EncoderConfig
from matching.encoder import Encoder
from matching.errors import ConfigError
from matching.types import Pooling, Preset

TEXTS = [
    "Acme black wireless headphones",
    "red running shoes",
    "a stainless steel coffee maker with a glass kettle and a timer",
    "yoga mat",
    "Globex silver gaming laptop 16 inch with a backlit keyboard",
    "x",
]


@pytest.fixture(scope="module")
def encoders(tiny_model_dir: Path, one_torch_thread: Any) -> dict[Preset, Encoder]:
    return {p: Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), preset=p)) for p in Preset}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(Preset))
def test_config_round_trips_the_preset(preset: Preset, tmp_path: Path) -> None:
    config = EncoderConfig(model="m", preset=preset)
    assert config.to_dict()["preset"] == preset.value
    assert EncoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    config.save(tmp_path / "encoder.json")
    loaded = EncoderConfig.load(tmp_path / "encoder.json")
    assert loaded == config
    assert loaded.preset is preset


def test_config_reads_a_preset_string_and_rejects_unknown_ones() -> None:
    assert EncoderConfig.from_dict({"preset": "fast"}).preset is Preset.FAST
    with pytest.raises(ConfigError, match=r"preset: 'turbo' is not one of \['exact', 'default', 'fast'\]"):
        EncoderConfig.from_dict({"preset": "turbo"})


def test_a_config_without_a_preset_gets_the_default() -> None:
    assert EncoderConfig.from_dict({}).preset is EncoderConfig().preset


def test_encoder_exposes_and_records_its_preset(encoders: dict[Preset, Encoder]) -> None:
    for preset, encoder in encoders.items():
        assert encoder.preset is preset
        assert encoder.config().preset is preset
        assert encoder.clone(source="copy").preset is preset


# -- vectors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", [Preset.DEFAULT, Preset.FAST])
def test_presets_stay_close_to_exact(encoders: dict[Preset, Encoder], preset: Preset) -> None:
    exact = encoders[Preset.EXACT].encode(TEXTS)
    vectors = encoders[preset].encode(TEXTS)
    assert vectors.dtype == np.float32
    assert vectors.shape == exact.shape
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _cosines(vectors, exact).min() > 0.99


@pytest.mark.parametrize("preset", list(Preset))
def test_preset_vectors_do_not_depend_on_batching_or_order(encoders: dict[Preset, Encoder], preset: Preset) -> None:
    encoder = encoders[preset]
    together = encoder.encode(TEXTS)
    alone = np.stack([encoder.encode([t])[0] for t in TEXTS])
    reversed_ = encoder.encode(TEXTS[::-1], batch_size=4)[::-1]
    # reduced precision rounds a little differently per batch shape, never by much
    atol = 1e-5 if preset is Preset.EXACT else 2e-2
    np.testing.assert_allclose(alone, together, atol=atol, rtol=0)
    np.testing.assert_allclose(reversed_, together, atol=atol, rtol=0)


def test_fingerprint_is_the_same_for_every_preset(encoders: dict[Preset, Encoder]) -> None:
    prints = {encoder.fingerprint for encoder in encoders.values()}
    assert len(prints) == 1
    for encoder in encoders.values():
        encoder.encode(TEXTS[:2])  # building the inference copy leaves the float32 weights alone
        assert encoder.model.dtype == torch.float32
        encoder._fingerprint = None
    assert {encoder.fingerprint for encoder in encoders.values()} == prints


def test_the_inference_copy_follows_weight_changes(
    tiny_encoder: Encoder, other_model_dir: Path, tmp_path: Path
) -> None:
    other = Encoder.from_pretrained(EncoderConfig(model=str(other_model_dir), preset=Preset.DEFAULT))
    encoder = tiny_encoder.clone(source="copy")
    encoder.set_preset(Preset.DEFAULT)
    before = encoder.encode(TEXTS)
    other.save_weights(tmp_path / "w.safetensors")
    encoder.load_weights(tmp_path / "w.safetensors")
    after = encoder.encode(TEXTS)
    np.testing.assert_allclose(after, other.encode(TEXTS), atol=1e-6, rtol=0)
    assert not np.allclose(after, before, atol=1e-3)
    assert encoder.fingerprint == other.fingerprint
    encoder.model.encoder.layer[-1] = copy.deepcopy(tiny_encoder.model.encoder.layer[-1])  # a swapped submodule
    swapped = encoder.encode(TEXTS)
    assert not np.allclose(swapped, after, atol=1e-3)
    np.testing.assert_array_equal(encoder.encode(TEXTS), swapped)


def test_set_preset_switches_the_inference_copy(tiny_encoder: Encoder, encoders: dict[Preset, Encoder]) -> None:
    encoder = tiny_encoder.clone(source="copy")
    for preset in (Preset.FAST, Preset.EXACT, Preset.DEFAULT):
        encoder.set_preset(preset)
        assert encoder.preset is preset
        np.testing.assert_allclose(encoder.encode(TEXTS), encoders[preset].encode(TEXTS), atol=1e-6, rtol=0)


def test_cls_pooling_presets(tiny_model_dir: Path) -> None:
    exact = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), pooling=Pooling.CLS, preset="exact"))
    fast = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), pooling=Pooling.CLS, preset="default"))
    assert _cosines(fast.encode(TEXTS), exact.encode(TEXTS)).min() > 0.99


def test_a_failed_trace_falls_back_to_eager(
    tiny_encoder: Encoder, encoders: dict[Preset, Encoder], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(module: Any, example: Any) -> Any:
        raise RuntimeError("no tracing today")

    monkeypatch.setattr(accel, "_trace", broken)
    encoder = Encoder.from_pretrained(EncoderConfig(model=tiny_encoder.source, preset=Preset.DEFAULT, device="cpu"))
    assert encoder.plan.trace
    vectors = encoder.encode(TEXTS)
    runner = encoder._runner
    if isinstance(runner, accel.BySize):  # a bfloat16 CPU: the traced copy is the one for small batches
        runner = runner._built[True]
    assert isinstance(runner, accel.Pooled)  # eager
    np.testing.assert_allclose(vectors, encoders[Preset.DEFAULT].encode(TEXTS), atol=2e-2, rtol=0)


# -- plans ----------------------------------------------------------------------------------------


def test_exact_is_float32_eager_everywhere() -> None:
    for device in ("cpu", "cuda", "mps"):
        plan = plan_for(Preset.EXACT, torch.device(device))
        assert plan == Plan(Preset.EXACT)
        assert plan.uses_base_model


def test_cpu_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(accel, "cpu_has_native_bf16", lambda: True)
    assert plan_for(Preset.DEFAULT, cpu) == Plan(Preset.DEFAULT, dtype=torch.bfloat16, trace=True, bulk_copy=True)
    monkeypatch.setattr(accel, "cpu_has_native_bf16", lambda: False)
    plan = plan_for(Preset.DEFAULT, cpu)
    assert plan == Plan(Preset.DEFAULT, dtype=torch.float32, trace=True)
    assert "no native bfloat16" in plan.notes[0]
    if accel.int8_available():
        cut = accel.FAST_MAX_TOKENS
        assert plan_for(Preset.FAST, cpu) == Plan(Preset.FAST, int8=True, trace=True, max_tokens=cut)
        monkeypatch.setattr(accel, "cpu_has_native_bf16", lambda: True)
        assert plan_for(Preset.FAST, cpu) == Plan(
            Preset.FAST,
            torch.bfloat16,
            int8=True,
            int8_max_tokens=accel.INT8_MAX_TOKENS,
            trace=True,
            max_tokens=cut,
            bulk_copy=True,
        )
    monkeypatch.setattr(accel, "int8_available", lambda: False)
    plan = plan_for(Preset.FAST, cpu)
    cut = accel.FAST_MAX_TOKENS
    assert plan == Plan(Preset.FAST, dtype=torch.bfloat16, trace=True, max_tokens=cut, bulk_copy=True)
    assert "runs like 'default'" in plan.notes[0]


@pytest.mark.parametrize(("bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_plans_use_half_precision_and_no_int8(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, dtype: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cuda = torch.device("cuda")
    assert plan_for(Preset.DEFAULT, cuda) == Plan(Preset.DEFAULT, dtype=dtype)
    fast = plan_for(Preset.FAST, cuda)
    assert fast == Plan(Preset.FAST, dtype=dtype, max_tokens=accel.FAST_MAX_TOKENS)
    assert not fast.int8
    assert not fast.trace
    assert "CPU-only" in fast.notes[0]


def test_plan_describe() -> None:
    assert Plan(Preset.EXACT).describe() == "exact (float32)"
    assert Plan(Preset.DEFAULT, dtype=torch.bfloat16, trace=True).describe() == "default (bfloat16, traced)"
    assert Plan(Preset.FAST, int8=True, trace=True).describe() == "fast (int8-dynamic, traced)"
    hybrid = Plan(Preset.FAST, torch.bfloat16, int8=True, int8_max_tokens=512, trace=True)
    assert hybrid.describe() == "fast (int8-dynamic up to 512 tokens a batch, else bfloat16, traced)"
    bulk = Plan(Preset.DEFAULT, dtype=torch.bfloat16, trace=True, bulk_copy=True)
    assert bulk.describe() == "default (bfloat16, traced, a bulk copy for batches over 1024 tokens)"


@pytest.mark.skipif(not accel.int8_available(), reason="no dynamic int8 in this torch build")
def test_fast_runs_int8_on_small_batches_and_the_wide_type_on_big_ones(
    tiny_model_dir: Path, encoders: dict[Preset, Encoder], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accel, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(accel, "INT8_MAX_TOKENS", 20)
    fast = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), preset=Preset.FAST, device="cpu"))
    assert fast.plan.int8_max_tokens == 20
    exact = encoders[Preset.EXACT].encode(TEXTS)
    big = fast.encode(TEXTS)  # 6 texts, > 20 tokens: bfloat16
    small = np.stack([fast.encode([t])[0] for t in TEXTS[3:]])  # <= 20 tokens each: int8
    assert isinstance(fast._runner, accel.BySize)
    assert _cosines(big, exact).min() > 0.99
    assert _cosines(small, exact[3:]).min() > 0.99
    default = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), preset=Preset.DEFAULT, device="cpu"))
    np.testing.assert_allclose(big, default.encode(TEXTS), atol=1e-6, rtol=0)


def test_fast_cuts_long_texts_at_its_token_limit(tiny_model_dir: Path) -> None:
    long_text = "red running shoes " * 80  # ~240 tokens, over the tiny model's 128-token limit
    fast = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), preset="fast"))
    exact = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), preset="exact", max_length=128))
    # the tiny model allows 128 tokens, below the cut: fast keeps them all, like exact
    assert fast.max_length == 128 < accel.FAST_MAX_TOKENS
    np.testing.assert_allclose(fast.encode([long_text]), exact.encode([long_text]), atol=0.05)
    assert fast.fingerprint == exact.fingerprint


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_a_narrowing_layer_multiplies_its_rows_in_chunks_up_to_a_bound() -> None:
    """RowChunked: above CHUNK_ROWS and up to CHUNKED_MAX_ROWS rows its output is, bit for bit, the layer's over
    each chunk of CHUNK_ROWS rows; outside that, the layer's over all rows; leading dimensions kept. Only layers
    with more inputs than outputs are replaced, and the scripted module traces with its loop (any row count)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 8).bfloat16().eval()
    chunked = torch.jit.script(accel.RowChunked(linear))
    chunk, most = accel.CHUNK_ROWS, accel.CHUNKED_MAX_ROWS
    with torch.inference_mode():
        for rows in (1, chunk, chunk + 1, 5 * chunk + 3, most, most + 1, 3 * most):
            x = torch.randn(rows, 24).bfloat16()
            if chunk < rows <= most:
                want = torch.cat([linear(part) for part in x.split(chunk)])
            else:
                want = linear(x)
            assert torch.equal(chunked(x), want)
        x3 = torch.randn(4, 20, 24).bfloat16()
        want3 = torch.cat([linear(p) for p in x3.reshape(80, 24).split(chunk)]).reshape(4, 20, 8)
        assert torch.equal(chunked(x3), want3)

    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 8), torch.nn.Linear(8, 8))
    model = model.bfloat16().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    accel._batch_invariant(model)
    assert [type(m).__name__ for m in model] == ["Linear", "GELU", "RecursiveScriptModule", "Linear"]

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    with torch.inference_mode():
        # traced and frozen as the presets are, on 48 rows; the loop survives, whatever the rows later
        example = torch.randn(3, 16, 8).bfloat16()
        traced = accel._trace(Wrap().eval(), {"input_ids": example, "attention_mask": example})
        assert "prim::Loop" in str(traced.graph)
        for shape in ((1, 16, 8), (2, 16, 8), (16, 16, 8), (64, 16, 8), (100, 16, 8), (3, 48, 8)):
            x = torch.randn(*shape).bfloat16()
            assert torch.equal(traced(x, x), model(x))
