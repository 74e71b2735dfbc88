"""Layer truncation + distillation into a loadable student checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_catalogue

from matching.config import EncoderConfig
from matching.encoder import Encoder
from matching.errors import ConfigError
from matching.training.distill import REPORT_FILE, DistillReport, distill, truncate
from matching.types import Pooling, Preset

TITLES = make_catalogue()["title"].tolist() + [
    f"{colour} {thing} {size}"
    for colour in ("black", "white", "red", "blue")
    for thing in ("cotton t-shirt", "leather belt", "wool socks", "glass mug", "wooden chair")
    for size in ("small", "large")
]
SETTINGS: dict[str, Any] = {"layers": 1, "epochs": 8, "batch_size": 8, "lr": 1e-4, "show_progress": False}


@pytest.fixture(scope="module")
def teacher(tiny_model_dir: Path, one_torch_thread: Any) -> Encoder:
    return Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), preset=Preset.EXACT))


@pytest.fixture(scope="module")
def distilled(teacher: Encoder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DistillReport]:
    out = tmp_path_factory.mktemp("distill") / "student"
    return out, distill(teacher, TITLES, out, **SETTINGS)


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1)))


def test_the_student_is_a_normal_checkpoint_with_n_layers(distilled: tuple[Path, DistillReport]) -> None:
    out, _ = distilled
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "modules.json", REPORT_FILE):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    student = Encoder.from_pretrained(EncoderConfig(model=str(out), preset=Preset.EXACT))
    assert student.model.config.num_hidden_layers == 1
    assert len(student.model.encoder.layer) == 1
    assert student.pooling is Pooling.MEAN
    assert student.max_length == 128
    assert student.encode(TITLES[:3]).shape == (3, 32)
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_training_brings_the_student_closer_to_the_teacher(
    teacher: Encoder, distilled: tuple[Path, DistillReport]
) -> None:
    out, report = distilled
    target = teacher.encode(TITLES)
    untrained = Encoder(truncate(teacher.model, 1), teacher.tokenizer, max_length=teacher.max_length)
    trained = Encoder.from_pretrained(EncoderConfig(model=str(out), preset=Preset.EXACT))
    gap_before = 1.0 - _mean_cosine(untrained.encode(TITLES), target)
    gap_after = 1.0 - _mean_cosine(trained.encode(TITLES), target)
    assert gap_after < 0.2 * gap_before
    assert report.cosine_after > report.cosine_before
    assert report.layers == 1
    assert report.teacher_layers == 2
    assert report.train_texts + report.held_out_texts == len(set(TITLES))
    assert report.held_out_texts == round(0.1 * len(set(TITLES)))
    assert len(report.epoch_losses) == 8
    assert report.teacher_fingerprint == teacher.fingerprint
    assert report.seconds > 0
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["cosine_after"] == pytest.approx(report.cosine_after)


def test_distillation_is_seeded(teacher: Encoder, distilled: tuple[Path, DistillReport], tmp_path: Path) -> None:
    _, first = distilled
    again = distill(teacher, TITLES, tmp_path / "again", **SETTINGS)
    assert again.epoch_losses == pytest.approx(first.epoch_losses, rel=1e-5)
    assert again.cosine_after == pytest.approx(first.cosine_after, abs=1e-6)


def test_cls_pooling_travels_with_the_student(tiny_model_dir: Path, tmp_path: Path) -> None:
    cls = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), pooling=Pooling.CLS, max_length=16))
    distill(cls, TITLES[:10], tmp_path / "s", layers=2, epochs=1, show_progress=False)
    student = Encoder.from_pretrained(EncoderConfig(model=str(tmp_path / "s")))
    assert student.pooling is Pooling.CLS
    assert student.max_length == 16
    assert student.model.config.num_hidden_layers == 2


@pytest.mark.parametrize("layers", [0, -1, 3, 2.0, True])
def test_bad_layer_counts_are_refused(teacher: Encoder, tmp_path: Path, layers: Any) -> None:
    with pytest.raises(ConfigError, match=r"layers must be an integer from 1 to the teacher's 2 layers"):
        distill(teacher, TITLES, tmp_path / "s", layers=layers, show_progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs and batch_size must be >= 1"),
        ({"batch_size": 0}, "epochs and batch_size must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"loss": "l1"}, "loss must be 'cosine' or 'mse'"),
        ({"held_out": 1.0}, r"held_out must be a share in \(0, 1\)"),
    ],
)
def test_bad_settings_are_refused(teacher: Encoder, tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        distill(teacher, TITLES, tmp_path / "s", layers=1, show_progress=False, **kwargs)


@pytest.mark.parametrize("texts", [[], ["only one"], ["  ", "same", "same"], "a string"])
def test_too_few_texts_are_refused(teacher: Encoder, tmp_path: Path, texts: Any) -> None:
    with pytest.raises(ConfigError, match="texts"):
        distill(teacher, texts, tmp_path / "s", layers=1, show_progress=False)


def test_an_existing_output_is_not_overwritten(teacher: Encoder, tmp_path: Path) -> None:
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        distill(teacher, TITLES, out, layers=1, show_progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_mse_loss_trains_too(teacher: Encoder, tmp_path: Path) -> None:
    report = distill(teacher, TITLES, tmp_path / "s", **{**SETTINGS, "loss": "mse"})
    assert report.loss == "mse"
    assert report.cosine_after > report.cosine_before


def test_sentences_are_cut_from_long_texts() -> None:
    from matching.training.distill import sentence_chunks

    text = "Vitamin D helps bones. It is made in the skin! Is it? Yes; 3.5 mg per day is enough."
    assert sentence_chunks(text) == ["Vitamin D helps bones.", "It is made in the skin!", "3.5 mg per day is enough."]
    assert sentence_chunks("维生素D有助于骨骼健康。它在皮肤中合成！够了吗？") == [
        "维生素D有助于骨骼健康。",
        "它在皮肤中合成！",
    ]
    assert sentence_chunks("Acme red desk lamp, small") == []  # one sentence: trained on whole already


def test_sentence_chunks_and_extra_texts_join_the_training_set(teacher: Encoder, tmp_path: Path) -> None:
    long_texts = [
        f"{a} is a {b} product. It ships in a {c} box. Returns are free."
        for a, b, c in zip(TITLES[:20], ["red", "blue", "green", "black"] * 5, ["small", "large"] * 10, strict=True)
    ]
    queries = ["a red product", "free returns", "a small box", long_texts[0]]  # the last one is a text already
    report = distill(
        teacher, long_texts, tmp_path / "s", extra_texts=queries, **{**SETTINGS, "epochs": 1, "held_out": 0.1}
    )
    held = report.held_out_texts
    assert held == 2
    # 18 training texts and their distinct sentences: 18 first ones, 2 "It ships in a ... box.", 1 "Returns are free."
    assert report.sentence_chunks == 18 + 2 + 1
    assert report.extra_texts == 3  # the text repeated as a query is not added again
    assert report.train_texts == 18 + report.sentence_chunks + report.extra_texts
    assert report.similarity == 1.0
