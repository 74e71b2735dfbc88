"""Layer truncation + distillation: a smaller, faster student encoder trained to copy a teacher.

The student is the teacher's embeddings plus its first ``layers`` transformer layers. It is trained,
without labels, to reproduce the teacher's L2-normalised pooled vectors on your own texts (catalogue
titles), then written as an ordinary transformers checkpoint directory (``config.json``,
``model.safetensors``, tokenizer files and sentence-transformers side files), so that
``Encoder.from_pretrained(EncoderConfig(model=out_dir))`` and ``SentenceTransformer(out_dir)`` load it.

The student's vectors approximate the teacher's but are not the same vector space (its fingerprint
differs): titles must be re-encoded with the student before it serves queries.

    report = distill(Encoder.from_pretrained(), titles, "models/minilm-l3", layers=3)
    print(report.cosine_before, report.cosine_after, report.seconds)
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from matching import progress
from matching.accel import bf16_training
from matching.analysis import CJK_CHAR
from matching.encoder import Encoder
from matching.errors import ConfigError, ModelError
from matching.training.loop import Optimisation
from matching.training.losses import CosineDistanceLoss, DistillationLoss, MSELoss
from matching.types import DistillLoss, Pooling, Preset

log = logging.getLogger(__name__)

REPORT_FILE = "distill_report.json"
# config.json keys that hold the layer count, by architecture (distilbert calls it n_layers)
_LAYER_KEYS = ("num_hidden_layers", "n_layers")
VECTOR_LOSSES: dict[DistillLoss, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    DistillLoss.COSINE: CosineDistanceLoss(),
    DistillLoss.MSE: MSELoss(),
}


@dataclass(frozen=True)
class DistillReport:
    """What :func:`distill` did. Cosines are student-vs-teacher means on the held-out texts (float32)."""

    out_dir: str
    teacher: str
    teacher_fingerprint: str
    layers: int
    teacher_layers: int
    train_texts: int
    held_out_texts: int
    epochs: int
    batch_size: int
    lr: float
    loss: str
    seed: int
    cosine_before: float  # the truncated, untrained student
    cosine_after: float
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    sentence_chunks: int = 0  # training texts that are sentences cut from longer texts
    extra_texts: int = 0  # e.g. the queries of training pairs
    similarity: float = 0.0  # weight of the in-batch similarity term

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_count(model: nn.Module) -> int:
    """The number of transformer layers a transformers model's config declares."""
    config = getattr(model, "config", None)
    for key in _LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ModelError(f"cannot tell how many layers a {type(model).__name__} has (no num_hidden_layers in its config)")


def truncate(model: nn.Module, layers: int) -> nn.Module:
    """A new model of the same class: the embeddings and the first ``layers`` layers of ``model``.

    Works from the config (so for every BERT-family architecture): a fresh model with ``layers``
    layers gets every weight whose name it shares with ``model``; all of its weights must be found.
    """
    total = layer_count(model)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= total:
        raise ConfigError(f"layers must be an integer from 1 to the teacher's {total} layers, got {layers!r}")
    config = copy.deepcopy(model.config)
    key = next(k for k in _LAYER_KEYS if isinstance(getattr(config, k, None), int))
    setattr(config, key, layers)
    student = type(model)(config)
    result = student.load_state_dict(model.state_dict(), strict=False)
    if result.missing_keys:
        raise ModelError(f"cannot truncate {type(model).__name__}: no teacher weights for {result.missing_keys[:5]}")
    return student.to(next(model.parameters()).device).eval()


def _clean_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ConfigError("texts must be a sequence of strings, not one string")
    out = list(dict.fromkeys(t.strip() for t in texts if isinstance(t, str) and t.strip()))
    if len(out) < 2:
        raise ConfigError(f"distillation needs at least 2 distinct non-empty texts, got {len(out)}")
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=\S)|(?<=[。！？；])")


def sentence_chunks(text: str, min_chars: int = 12) -> list[str]:
    """The sentences of a long text (split after . ! ? ; and their CJK forms), those of at least ``min_chars``
    characters (a CJK character counts three: it is about a word); a text with one sentence gives nothing (it
    is trained on whole already)."""
    parts = [p.strip() for p in _SENTENCE_END.split(text)]
    parts = [p for p in parts if len(p) + 2 * len(CJK_CHAR.findall(p)) >= min_chars]
    return parts if len(parts) > 1 else []


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar length: shuffle, sort within chunks of 32 batches, shuffle the batches."""
    perm = rng.permutation(len(lengths))
    chunk = batch_size * 32
    out: list[np.ndarray] = []
    for start in range(0, len(perm), chunk):
        part = perm[start : start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        out.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(out)
    return out


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1)))


def _write_side_files(out: Path, teacher: Encoder, dim: int) -> None:
    """sentence-transformers files: pooling and max length travel with the checkpoint."""
    pooling_dir = out / "1_Pooling"
    pooling_dir.mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": teacher.pooling is Pooling.CLS,
        "pooling_mode_mean_tokens": teacher.pooling is Pooling.MEAN,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (pooling_dir / "config.json").write_text(json.dumps(pooling, indent=2) + "\n", encoding="utf-8")
    st_config = {"max_seq_length": teacher.max_length, "do_lower_case": False}
    (out / "sentence_bert_config.json").write_text(json.dumps(st_config, indent=2) + "\n", encoding="utf-8")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    (out / "2_Normalize").mkdir(exist_ok=True)
    if teacher.prompts:  # the student reads texts as the teacher does (encoder.read_prompts)
        prompts = {"prompts": {"query": teacher.prompts.query, "title": teacher.prompts.title}}
        (out / "config_sentence_transformers.json").write_text(json.dumps(prompts, indent=2) + "\n", encoding="utf-8")


def distill(
    teacher: Encoder,
    texts: Sequence[str],
    out_dir: str | Path,
    *,
    layers: int = 3,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 2e-4,
    loss: DistillLoss | str = DistillLoss.COSINE,
    held_out: float = 0.1,
    seed: int = 0,
    mixed_precision: bool = True,
    show_progress: bool = True,
    sentences: bool = True,
    extra_texts: Sequence[str] = (),
    similarity: float = 1.0,
) -> DistillReport:
    """Train a ``layers``-layer student to reproduce ``teacher``'s vectors on ``texts``; save it in ``out_dir``.

    ``texts`` are the user's own texts (e.g. catalogue titles; no labels). Duplicates and blanks are
    dropped; a ``held_out`` share (at most 2,000) is kept aside to report the student-vs-teacher cosine
    before and after training. With ``sentences`` the student also trains on the sentences of the long
    training texts (queries are short: it must copy the teacher there too, and short texts are cheap
    steps); ``extra_texts`` (e.g. the queries of training pairs) are trained on as well. ``similarity``
    weighs a second term: the MSE between the batch's student and teacher similarity matrices, which
    asks the student to keep the teacher's ranking, not only each vector's direction. ``loss`` is ``"cosine"``
    (1 - cosine) or ``"mse"`` on the normalised vectors. AdamW with linear warm-up (first 10% of steps) and
    decay; seeded by ``seed``.
    ``mixed_precision`` trains under bfloat16 autocast on CPUs with native bfloat16 and on CUDA (the
    student's weights stay float32). The teacher's targets are encoded with its own preset, or
    ``default`` where the teacher runs ``fast``. ``out_dir`` must not exist or must be empty; the
    checkpoint is written next to it and moved into place only when complete.

    Raises :class:`~matching.errors.ConfigError` for bad arguments (``layers`` outside 1..teacher layers).
    """
    started = time.perf_counter()
    teacher_layers = layer_count(teacher.model)
    settings = _Settings(layers, epochs, batch_size, lr, loss, seed, similarity)
    out = _check_arguments(out_dir, teacher_layers, settings, held_out)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    split = _split_texts(_clean_texts(texts), rng, held_out, sentences, extra_texts)
    targets_train, targets_held = _targets(teacher, split, show_progress)
    model = truncate(teacher.model, layers)
    student = teacher.variant(model, source=str(out), preset=Preset.EXACT)
    cosine_before = _mean_cosine(student.encode_titles(split.held), targets_held)
    autocast = mixed_precision and bf16_training(student.device)
    epoch_losses = _train_student(student, model, split.train, targets_train, rng, settings, autocast, show_progress)
    cosine_after = _mean_cosine(student.encode_titles(split.held), targets_held)
    report = DistillReport(
        out_dir=str(out),
        teacher=teacher.source,
        teacher_fingerprint=teacher.fingerprint,
        teacher_layers=teacher_layers,
        train_texts=len(split.train),
        held_out_texts=len(split.held),
        cosine_before=cosine_before,
        cosine_after=cosine_after,
        epoch_losses=epoch_losses,
        seconds=time.perf_counter() - started,
        sentence_chunks=len(set(split.chunks) & set(split.added)),
        extra_texts=len(set(split.extras) & set(split.added)),
        **asdict(settings),
    )
    _save(student, teacher, out, report)
    log.info(
        "distilled %d of %d layers into %s: held-out cosine %.4f -> %.4f in %.0f s",
        layers,
        teacher_layers,
        out,
        cosine_before,
        cosine_after,
        report.seconds,
    )
    return report


@dataclass(frozen=True)
class _Settings:
    """The training settings of one distillation, as :class:`DistillReport` records them."""

    layers: int
    epochs: int
    batch_size: int
    lr: float
    loss: DistillLoss | str
    seed: int
    similarity: float


def _check_arguments(out_dir: str | Path, teacher_layers: int, settings: _Settings, held_out: float) -> Path:
    """The output directory, once every argument of :func:`distill` is checked."""
    layers, epochs, batch_size = settings.layers, settings.epochs, settings.batch_size
    lr, loss = settings.lr, settings.loss
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= teacher_layers:
        raise ConfigError(f"layers must be an integer from 1 to the teacher's {teacher_layers} layers, got {layers!r}")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    try:
        DistillLoss(loss)
    except ValueError:
        raise ConfigError(f"loss must be 'cosine' or 'mse', got {loss!r}") from None
    if not 0 < held_out < 1:
        raise ConfigError(f"held_out must be a share in (0, 1), got {held_out}")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{str(out)!r} already exists and is not an empty directory; choose a new output path")
    return out


@dataclass(frozen=True)
class _Split:
    """The texts of one distillation: ``held`` out for the report, ``train`` (the rest, then ``added``: sentence
    ``chunks`` of long texts and ``extras`` not already among them)."""

    held: list[str]
    train: list[str]
    chunks: list[str]
    extras: list[str]
    added: list[str]


def _split_texts(
    texts: list[str], rng: np.random.Generator, held_out: float, sentences: bool, extra_texts: Sequence[str]
) -> _Split:
    order = rng.permutation(len(texts))
    n_held = min(2000, max(1, round(len(texts) * held_out)))
    held = [texts[i] for i in order[:n_held]]
    train = [texts[i] for i in order[n_held:]]
    whole = set(train)
    chunks = [c for t in train for c in sentence_chunks(t) if c not in whole] if sentences else []
    if isinstance(extra_texts, str):
        raise ConfigError("extra_texts must be a sequence of strings, not one string")
    extras = [t.strip() for t in extra_texts if isinstance(t, str) and t.strip()]
    held_set = set(held)
    added = [t for t in dict.fromkeys(chunks + extras) if t not in whole and t not in held_set]
    return _Split(held, train + added, chunks, extras, added)


def _targets(teacher: Encoder, split: _Split, show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's vectors of the training and the held-out texts, encoded by a view on its weights in its own
    preset, or ``default`` where it runs ``fast`` (int8 is too noisy to copy)."""
    target_preset = Preset.DEFAULT if teacher.preset is Preset.FAST else teacher.preset
    view = teacher.variant(preset=target_preset)
    return view.encode_titles(split.train, show_progress=show_progress), view.encode_titles(split.held)


def _train_student(
    student: Encoder,
    model: nn.Module,
    train: list[str],
    targets: np.ndarray,
    rng: np.random.Generator,
    settings: _Settings,
    autocast: bool,
    show_progress: bool,
) -> list[float]:
    """Regress ``student``'s vectors of ``train`` onto the teacher's ``targets``: the mean loss of each epoch."""
    epochs, batch_size, device = settings.epochs, settings.batch_size, student.device
    steps = math.ceil(len(train) / batch_size) * epochs
    optimisation = Optimisation(
        model.parameters(),
        lr=settings.lr,
        weight_decay=0.01,
        total_steps=steps,
        warmup=0.1,
        clip=None,
        autocast=torch.bfloat16 if autocast else None,
        device=device,
    )
    objective = DistillationLoss(VECTOR_LOSSES[DistillLoss(settings.loss)], settings.similarity)
    lengths = np.asarray([len(t) for t in train])
    target_t = torch.from_numpy(targets)
    epoch_losses: list[float] = []
    bar = progress.bar(show_progress, total=steps, desc=f"distilling {settings.layers} layers", unit="batch")
    model.train()
    for module in model.modules():  # regression onto fixed targets: no dropout
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for _ in range(epochs):
        total = 0.0
        for idx in _batches(lengths, batch_size, rng):
            batch = student.tokenize(student.prompted([train[i] for i in idx], student.prompts.title))
            with optimisation.autocast():
                pred = student.embed(batch).float()
            total += optimisation.update(objective(pred, target_t[idx].to(device))) * len(idx)
            bar.update(1)
        epoch_losses.append(total / len(train))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.5f}")
    bar.close()
    model.eval()
    return epoch_losses


def _save(student: Encoder, teacher: Encoder, out: Path, report: DistillReport) -> None:
    """Write the checkpoint into a staging directory beside ``out``, then move it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a "Writing model shards" bar per file
    try:
        student.model.save_pretrained(staging, safe_serialization=True)
        teacher.tokenizer.save_pretrained(staging)
        _write_side_files(staging, teacher, student.dim)
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
