"""EncoderConfig / IndexConfig / ScorerConfig: JSON round trips and validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from matching.config import EncoderConfig, IndexConfig, ScorerConfig
from matching.errors import ConfigError
from matching.types import Fusion, Pooling

CONFIGS = [
    pytest.param(EncoderConfig(), id="encoder-defaults"),
    pytest.param(
        EncoderConfig(model="/models/bert", pooling=Pooling.CLS, max_length=64, batch_size=8, device="cpu"),
        id="encoder-all-fields",
    ),
    pytest.param(IndexConfig(), id="index-defaults"),
    pytest.param(IndexConfig(factory="IVF16,Flat", nprobe=4), id="index-ivf"),
    pytest.param(IndexConfig(factory="HNSW32", ef_search=64), id="index-hnsw"),
    pytest.param(ScorerConfig(dim=384), id="scorer-defaults"),
    pytest.param(ScorerConfig(dim=8, hidden=16, dropout=0.0), id="scorer-custom"),
    pytest.param(
        ScorerConfig(dim=8, lexical=True, dense_floor=0.35, dense_span=15.0, known_power=1.5, fusion=Fusion.ADAPTIVE),
        id="scorer-adaptive-span",
    ),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_dict_round_trip(config: Any) -> None:
    data = config.to_dict()
    json.dumps(data)  # every value is JSON-able (enums become their string values)
    again = type(config).from_dict(data)
    assert again == config
    assert again.to_dict() == data


@pytest.mark.parametrize("config", CONFIGS)
def test_file_round_trip(config: Any, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    config.save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == config.to_dict()
    assert type(config).load(path) == config


def test_pooling_is_written_as_its_string_value() -> None:
    assert EncoderConfig(pooling=Pooling.CLS).to_dict()["pooling"] == "cls"
    assert EncoderConfig().to_dict() == {
        "model": None,
        "pooling": None,
        "max_length": None,
        "batch_size": 64,
        "device": None,
        "preset": "default",
    }


def test_pooling_is_read_back_as_the_enum() -> None:
    config = EncoderConfig.from_dict({"pooling": "cls"})
    assert config.pooling is Pooling.CLS


@pytest.mark.parametrize(
    ("cls", "data"),
    [
        pytest.param(EncoderConfig, {"modle": "x"}, id="encoder-typo"),
        pytest.param(IndexConfig, {"factory": "Flat", "nlist": 4}, id="index-extra"),
        pytest.param(ScorerConfig, {"dim": 8, "layers": 2}, id="scorer-extra"),
    ],
)
def test_unknown_field_is_a_config_error(cls: Any, data: dict[str, Any]) -> None:
    unknown = (set(data) - {"factory", "dim"}).pop()
    with pytest.raises(ConfigError, match=unknown):
        cls.from_dict(data)


def test_unknown_field_in_a_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    path.write_text(json.dumps({"factory": "Flat", "bogus": 1}), encoding="utf-8")
    with pytest.raises(ConfigError, match="bogus"):
        IndexConfig.load(path)


def test_bad_pooling_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        EncoderConfig.from_dict({"pooling": "bogus"})


@pytest.mark.parametrize(
    ("cls", "kwargs", "needle"),
    [
        pytest.param(EncoderConfig, {"batch_size": 0}, "batch_size", id="encoder-batch-size-0"),
        pytest.param(EncoderConfig, {"batch_size": -3}, "batch_size", id="encoder-batch-size-negative"),
        pytest.param(EncoderConfig, {"max_length": 1}, "max_length", id="encoder-max-length-1"),
        pytest.param(ScorerConfig, {"dim": 0}, "dim", id="scorer-dim-0"),
        pytest.param(ScorerConfig, {"dim": 8, "hidden": 0}, "hidden", id="scorer-hidden-0"),
        pytest.param(ScorerConfig, {"dim": 8, "dropout": 1.0}, "dropout", id="scorer-dropout-1"),
        pytest.param(ScorerConfig, {"dim": 8, "dropout": -0.1}, "dropout", id="scorer-dropout-negative"),
        pytest.param(ScorerConfig, {"dim": 8, "dense_span": 15.0}, "dense_span", id="scorer-span-without-adaptive"),
        pytest.param(
            ScorerConfig,
            {"dim": 8, "lexical": True, "fusion": Fusion.ADAPTIVE, "dense_span": -1.0},
            "dense_span",
            id="scorer-span-negative",
        ),
        pytest.param(ScorerConfig, {"dim": 8, "known_power": 2.0}, "known_power", id="scorer-power-without-adaptive"),
        pytest.param(
            ScorerConfig,
            {"dim": 8, "lexical": True, "fusion": Fusion.ADAPTIVE, "known_power": 0.5},
            "known_power",
            id="scorer-power-below-1",
        ),
    ],
)
def test_out_of_range_values_are_config_errors(cls: Any, kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        cls(**kwargs)
    with pytest.raises(ConfigError, match=needle):
        cls.from_dict(kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        pytest.param(EncoderConfig, {"max_length": 2}, id="encoder-max-length-2"),
        pytest.param(EncoderConfig, {"batch_size": 1}, id="encoder-batch-size-1"),
        pytest.param(ScorerConfig, {"dim": 1, "hidden": 1, "dropout": 0.0}, id="scorer-minimal"),
        pytest.param(ScorerConfig, {"dim": 1, "dropout": 0.999}, id="scorer-dropout-below-1"),
    ],
)
def test_boundary_values_are_accepted(cls: Any, kwargs: dict[str, Any]) -> None:
    assert cls(**kwargs).to_dict().items() >= kwargs.items()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nprobe": 0},
        {"ef_search": 0},
        {"refine_factor": 0},
        {"memory_budget": 0},
        {"target_recall": 0.0},
        {"target_recall": 1.5},
    ],
    ids=["nprobe-0", "ef-search-0", "refine-0", "budget-0", "recall-0", "recall-1.5"],
)
def test_index_settings_must_be_in_range(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        IndexConfig(factory="IVF4,Flat", **kwargs)


def test_index_defaults_choose_automatically() -> None:
    assert IndexConfig().to_dict() == {
        "factory": "auto",
        "nprobe": None,
        "ef_search": None,
        "refine_factor": None,
        "memory_budget": None,
        "target_recall": 0.95,
        "backend": "faiss",
    }


def test_wrong_value_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        EncoderConfig.from_dict({"batch_size": "64"})


def test_missing_required_field_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="dim"):
        ScorerConfig.from_dict({"hidden": 16})
