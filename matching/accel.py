"""Inference speed-ups behind the encoder presets.

A preset never changes the encoder's own float32 weights (``Encoder.model``: training, saving and the
fingerprint use those); it builds a separate inference copy from them:

=========  ==============================================  ======================================
preset     CPU                                             CUDA
=========  ==============================================  ======================================
exact      float32, eager (the reference)                  float32, eager
default    bfloat16 weights, TorchScript-traced; batches   bfloat16 (float16 without bf16 support)
           over 1,024 padded tokens (titles in bulk):
           bfloat16 untraced, with a short-text
           attention and prepacked linear layers
fast       texts cut at 192 tokens; batches of <= 256       as default (dynamic int8 is CPU-only),
           padded tokens (one query, a few titles): int8   texts cut at 192 tokens
           dynamic quantisation of every Linear
           (per-channel weights), traced; bigger
           batches: bfloat16 untraced, over 1,024
           tokens as default's. Each built on first
           use.
=========  ==============================================  ======================================

On a CPU without native bfloat16 (no AVX512-BF16/AMX), where bfloat16 is emulated and slower than
float32, ``default`` runs float32 traced for every batch instead and ``fast`` runs int8 for every batch. Every
fallback is logged once and recorded in :attr:`Plan.notes`. The traced module is checked against the
eager one on a padded batch of another shape before it is used; if they disagree (or tracing fails)
the eager copy is used.
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from matching.attention import use_short_attention
from matching.packed import pack_linears
from matching.types import Pooling, Preset

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# 'fast' on a bf16 CPU: batches up to this many padded tokens run int8, bigger ones bf16. Measured on
# the dev machine (Xeon, AMX): one 10-word query 1.3 ms int8 vs 2.5 ms bf16; 64 short titles
# (~1,100 tokens) bf16 is ~2x faster; they break even around 300-500 tokens.
INT8_MAX_TOKENS = 256
# 'fast' cuts texts at this many tokens (when the encoder allows more). all-MiniLM-L6-v2 was trained on
# 128-token inputs and runs at 256; long texts cost quadratically in attention. Measured on SciFact
# abstracts (bf16): 192 tokens 0.6450 nDCG@10 vs 0.6444 at 256 and 3.7x sentence-transformers' speed;
# 160 tokens -1.6 points, 128 tokens -2.0 points. Short titles never reach the cut.
FAST_MAX_TOKENS = 192
# batches of more padded tokens than this (a title batch has ~4,096) run the bulk copy: untraced, so that the width
# picks matching.attention's path per batch, with matching.packed's layers (20,000 generated titles: 2,956 -> 4,126
# titles/s, bf16, Xeon with AMX, 2 threads; scripts/bench_encode.py). Query batches up to this size (64 queries of
# 16 tokens), and every batch encode_queries runs, keep the traced copy, whose vectors do not depend on the batch
BULK_MIN_TOKENS = 1024


@dataclass(frozen=True)
class Plan:
    """What an encoder preset resolves to on one device."""

    preset: Preset
    dtype: torch.dtype = torch.float32  # weights/activations of the inference copy
    int8: bool = False  # dynamic int8 quantisation of the Linear layers (CPU only)
    # with int8: batches of more padded tokens than this run ``dtype`` instead (None: int8 always)
    int8_max_tokens: int | None = None
    trace: bool = False  # TorchScript trace of model + pooling (CPU only)
    max_tokens: int | None = None  # cut texts at this many tokens (below the encoder's own max_length)
    # batches of more than BULK_MIN_TOKENS padded tokens run an untraced bfloat16 copy with matching.attention's
    # short-text attention and matching.packed's linear layers (CPU only)
    bulk_copy: bool = False
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def uses_base_model(self) -> bool:
        """True when inference runs the float32 weights as they are (no copy is made)."""
        return self.dtype == torch.float32 and not self.int8 and not self.trace

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        if self.int8 and self.int8_max_tokens is not None:
            parts = [f"int8-dynamic up to {self.int8_max_tokens} tokens a batch, else {dtype}"]
        else:
            parts = ["int8-dynamic" if self.int8 else dtype]
        if self.trace:
            parts.append("traced")
        if self.max_tokens:
            parts.append(f"texts cut at {self.max_tokens} tokens")
        if self.bulk_copy:
            parts.append(f"a bulk copy for batches over {BULK_MIN_TOKENS} tokens")
        return f"{self.preset.value} ({', '.join(parts)})"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively here (AVX512-BF16 or AMX), so bf16 beats float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def bf16_training(device: torch.device) -> bool:
    """Whether training on ``device`` gains from bfloat16 autocast: CUDA, or a CPU with native bfloat16."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def int8_available() -> bool:
    """Whether the eager dynamic int8 quantisation backend is present in this torch build."""
    engines = getattr(torch.backends.quantized, "supported_engines", [])
    return hasattr(torch.ao.quantization, "quantize_dynamic") and any(e in engines for e in ("fbgemm", "x86"))


def plan_for(preset: Preset | str, device: torch.device) -> Plan:
    """Resolve ``preset`` for ``device``, falling back (with a note) where a setting is unavailable."""
    preset = Preset(preset)
    if preset is Preset.EXACT:
        return Plan(preset)
    notes: list[str] = []
    if device.type == "cuda":
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if preset is Preset.FAST:
            notes.append(f"dynamic int8 quantisation is CPU-only; 'fast' runs {half} on {device}")
            return Plan(preset, dtype=half, max_tokens=FAST_MAX_TOKENS, notes=tuple(notes))
        return Plan(preset, dtype=half, notes=tuple(notes))
    if device.type != "cpu":
        notes.append(f"no speed-ups for device {device}; preset {preset.value!r} runs float32")
        return Plan(preset, max_tokens=FAST_MAX_TOKENS if preset is Preset.FAST else None, notes=tuple(notes))
    bf16 = cpu_has_native_bf16()
    if preset is Preset.FAST:
        if int8_available():
            # int8 (VNNI) wins on small batches such as one query; bf16 (AMX) wins on big ones
            if bf16:
                return Plan(
                    preset,
                    torch.bfloat16,
                    int8=True,
                    int8_max_tokens=INT8_MAX_TOKENS,
                    trace=True,
                    max_tokens=FAST_MAX_TOKENS,
                    bulk_copy=True,
                )
            return Plan(preset, int8=True, trace=True, max_tokens=FAST_MAX_TOKENS)
        notes.append("this torch build has no dynamic int8 quantisation; 'fast' runs like 'default'")
    if not bf16:
        notes.append("this CPU has no native bfloat16 (AVX512-BF16/AMX); running float32")
    cut = FAST_MAX_TOKENS if preset is Preset.FAST else None
    dtype = torch.bfloat16 if bf16 else torch.float32
    # float32 (4,000 titles): the untraced copy with the short-text attention gained nothing on the traced one
    return Plan(preset, dtype=dtype, trace=True, max_tokens=cut, bulk_copy=bf16, notes=tuple(notes))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Token vectors -> one unit vector per text: the [CLS] token, or the mean over real tokens (clamped)."""
    if pooling is Pooling.CLS:
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)


class Pooled(nn.Module):
    """Model + pooling + L2 normalisation in one module: ``(input_ids, attention_mask) -> float32 vectors``."""

    def __init__(self, model: nn.Module, pooling: Pooling) -> None:
        super().__init__()
        self.model = model
        self.pooling = Pooling(pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        return pool(hidden, attention_mask, self.pooling)


# oneDNN's bfloat16 GEMM picks its kernel by the number of rows, and for a wide input (the FFN's down-projection,
# 1,536 -> 384 in MiniLM) the kernel for 48-368 rows (64-496 on 2 threads) rounds differently from the one for
# 16-32 rows or from 384 up: a query's vector moved by up to 1.3e-3 with the batch it was encoded in (80 of 128
# generated queries bit-identical alone and in batches of 16, Xeon with AMX; the other layers were identical at
# every size). Such a layer multiplies CHUNK_ROWS rows at a time while its input has at most CHUNKED_MAX_ROWS rows
# (query batches: 64 queries of 16 tokens; a title batch has ~4,096 padded tokens and keeps one GEMM): 128 of 128
# identical, a batch of 16 queries 13.2 -> 16.5 ms (torch on 1 thread), one query 3.8 -> 4.0 ms. A bigger query
# batch (a search_batch of hundreds, or 32 long queries) runs one GEMM too: its kernel matched the 32-row one here
# from 384 rows up (512 on 2 threads), which nothing guarantees on other CPUs or thread counts.
CHUNK_ROWS = 32
# tied to the bulk copy's threshold: every batch left to the invariant copy (at most BULK_MIN_TOKENS padded tokens,
# so at most as many rows) is multiplied in chunks
CHUNKED_MAX_ROWS = BULK_MIN_TOKENS


class RowChunked(nn.Module):
    """A linear layer that multiplies at most ``CHUNK_ROWS`` rows at a time while its input (all leading
    dimensions together) has at most ``CHUNKED_MAX_ROWS`` rows, so each row's result is the same in any batch."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.chunk = CHUNK_ROWS
        self.max_rows = CHUNKED_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= self.chunk or rows.shape[0] > self.max_rows:
            out = nn.functional.linear(rows, self.weight, self.bias)
        else:
            parts = torch.split(rows, self.chunk)
            out = torch.cat([nn.functional.linear(part, self.weight, self.bias) for part in parts])
        shape = list(x.shape[:-1])
        shape.append(out.shape[-1])
        return out.reshape(shape)


def _batch_invariant(model: nn.Module) -> None:
    """Replace, in place, every linear layer of ``model`` that narrows its input (more inputs than outputs) by a
    scripted :class:`RowChunked` of the same weights (scripted, so that a trace keeps its loop)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features > child.out_features:
                with warnings.catch_warnings():  # torch.jit's deprecation notice, as for the trace
                    warnings.simplefilter("ignore")
                    setattr(parent, name, torch.jit.script(RowChunked(child)))


def _quantize_int8(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # eager-mode quantisation is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        quantized: nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True
        )
    return quantized


def _trace(module: nn.Module, example: Batch) -> Any:
    from transformers.utils import logging as hf_logging

    # Freezing reads every property of the model, and transformers warns about an unset loss type.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():  # TracerWarnings and the torch.jit deprecation notices
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                module, (example["input_ids"], example["attention_mask"]), check_trace=False, strict=False
            )
            return torch.jit.freeze(traced.eval())
    finally:
        hf_logging.set_verbosity(verbosity)


class BySize:
    """Run the ``small`` runner on batches of at most ``max_tokens`` padded tokens and ``large`` on bigger ones;
    each is built on first use (a bulk build never needs the int8 copy, a query-only service never the large one:
    each copy costs a deep copy, a conversion and a trace)."""

    def __init__(self, small: Callable[[], Runner], large: Callable[[], Runner], max_tokens: int) -> None:
        self._make = {True: small, False: large}
        self._built: dict[bool, Runner] = {}
        self._lock = threading.Lock()
        self.max_tokens = max_tokens

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.run(input_ids.numel() <= self.max_tokens, input_ids, attention_mask)

    def run(self, small: bool, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the ``small`` (True) or the ``large`` runner on the batch, whatever its size."""
        runner = self._built.get(small)
        if runner is None:
            with self._lock:
                if small not in self._built:
                    with torch.inference_mode(False):
                        self._built[small] = self._make[small]()
                runner = self._built[small]
        return runner(input_ids, attention_mask)


class WithBulk(BySize):
    """A :class:`BySize` whose ``large`` runner is the bulk copy (:attr:`Plan.bulk_copy`); :meth:`invariant`
    keeps a batch on the ``small`` one, whose vectors do not depend on the batch."""

    def invariant(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the batch on the copy whose vectors do not depend on the batch, whatever its size."""
        return self.run(True, input_ids, attention_mask)


def build_runner(model: nn.Module, pooling: Pooling, plan: Plan, examples: tuple[Batch, Batch]) -> Runner:
    """An inference callable for ``plan`` built from copies of ``model`` (which is left untouched).

    ``examples`` are two padded batches of different shapes on the model's device: the first is traced,
    the second checks that the trace generalises to other batch sizes and lengths.
    """
    if plan.uses_base_model:
        return Pooled(model, pooling).eval()
    int8_max = plan.int8_max_tokens
    if plan.int8 and int8_max is not None:

        def base() -> Runner:
            return BySize(
                lambda: _variant(model, pooling, torch.float32, int8=True, trace=plan.trace, examples=examples),
                # untraced: on big batches a trace gains nothing (3,000 titles: 1.027 s traced, 1.024 s eager)
                # and costs 0.2-0.35 s to build, which a bulk build pays
                lambda: _variant(model, pooling, plan.dtype, int8=False, examples=examples),
                int8_max,
            )

    else:

        def base() -> Runner:
            return _variant(model, pooling, plan.dtype, int8=plan.int8, trace=plan.trace, examples=examples)

    if not (plan.bulk_copy and all(p.device.type == "cpu" for p in model.parameters())):
        return base()
    # its batches have more rows than RowChunked ever splits, so it goes without
    return WithBulk(
        base,
        lambda: _variant(model, pooling, plan.dtype, int8=False, short=True, invariant=False, examples=examples),
        BULK_MIN_TOKENS,
    )


def _variant(
    model: nn.Module,
    pooling: Pooling,
    dtype: torch.dtype,
    *,
    int8: bool,
    examples: tuple[Batch, Batch],
    trace: bool = False,
    short: bool = False,
    invariant: bool = True,
) -> Runner:
    """A copy of ``model`` in ``dtype`` (or int8), traced or with :mod:`matching.attention`'s attention;
    ``invariant``: a bfloat16 CPU copy's narrowing layers are :class:`RowChunked`."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    if short and not use_short_attention(work):
        log.info("this model does not take another attention function; its bulk copy keeps its own")
    if int8:
        work = _quantize_int8(work.float())
    elif dtype != torch.float32:
        work = work.to(dtype)
        if dtype == torch.bfloat16 and all(p.device.type == "cpu" for p in work.parameters()):
            if invariant:
                _batch_invariant(work)
            elif short:
                pack_linears(work)
    eager = Pooled(work, pooling).eval()
    if not trace:
        return eager
    what = "int8" if int8 else str(dtype).removeprefix("torch.")
    trace_on, check_on = examples
    try:
        with torch.inference_mode():
            traced = _trace(eager, trace_on)
            want = eager(check_on["input_ids"], check_on["attention_mask"])
            got = traced(check_on["input_ids"], check_on["attention_mask"])
            ok = got.shape == want.shape and bool(torch.allclose(got, want, atol=1e-3, rtol=0))
    except Exception as exc:  # tracing is an optimisation: any failure means eager
        log.info("TorchScript trace failed (%s: %s); running %s eagerly", type(exc).__name__, exc, what)
        return eager
    if not ok:
        log.info("the TorchScript trace does not generalise across shapes; running %s eagerly", what)
        return eager
    runner: Runner = traced
    return runner
