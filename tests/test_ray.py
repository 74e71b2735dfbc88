"""Builds on a real local Ray cluster (2 CPUs, one encoder actor) against the local build of the same files."""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from matching import BadRowError, ConfigError, DuplicateIdError, Matcher, distributed
from tests.conftest import make_catalogue

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def split_files(directory: Path, df: pd.DataFrame) -> Path:
    """``df`` as three files of three formats in ``directory``, read in name order."""
    directory.mkdir(parents=True, exist_ok=True)
    third = len(df) // 3
    df.iloc[:third].to_csv(directory / "a.csv", index=False)
    df.iloc[third : 2 * third].to_json(directory / "b.jsonl", orient="records", lines=True)
    df.iloc[2 * third :].to_parquet(directory / "c.parquet")
    return directory


def build(source: Any, out: Path, encoder: Any, **kwargs: Any) -> Matcher:
    return Matcher.build(source, out, encoder=encoder, show_progress=False, **kwargs)


def test_a_ray_build_equals_the_local_build(cluster: None, tmp_path: Path, tiny_encoder: Any) -> None:
    source = split_files(tmp_path / "src", make_catalogue())
    with (
        build(source, tmp_path / "local", tiny_encoder) as local,
        build(source, tmp_path / "ray", tiny_encoder, engine="ray", encoders=1) as on_ray,
    ):
        pd.testing.assert_frame_equal(on_ray.catalogue(), local.catalogue())
        assert on_ray.catalogue()["id"].tolist() == make_catalogue()["id"].tolist()  # ints, in file order
        assert on_ray.manifest.id_type == local.manifest.id_type == "int"
        np.testing.assert_allclose(on_ray.store.vectors, local.store.vectors, rtol=0, atol=1e-5)
        for query in ("acme red coffee maker", "wireless headphones", "blue desk lamp"):
            a, b = local.search(query, 5), on_ray.search(query, 5)
            assert [m.id for m in b] == [m.id for m in a]
            np.testing.assert_allclose([m.score for m in b], [m.score for m in a], atol=1e-5)
        record = on_ray.manifest.source["build"]
        assert record["engine"] == "ray"
        assert record["encoders"] == 1
        assert record["files"] == 3
        assert record["cluster_cpus"] == 2
        assert set(record["seconds"]) == {"read_and_encode", "index", "lexical"}
        assert all(v > 0 for v in record["titles_per_second"].values())
        assert 0 < record["first_encode_after_seconds"] < record["seconds"]["read_and_encode"]
        assert 0 < record["actor_encode_seconds"] < record["seconds"]["read_and_encode"]
        assert local.manifest.source["build"]["engine"] == "local"


@pytest.mark.parametrize("encoders", [1, 2])  # 2: the reads are tasks apart from the actors
def test_a_bad_row_fails_the_whole_build_and_publishes_nothing(
    cluster: None, tmp_path: Path, tiny_encoder: Any, encoders: int
) -> None:
    df = make_catalogue()
    df.loc[len(df) // 3 + 2, "title"] = "   "  # row 3 of the second file
    source = split_files(tmp_path / "src", df)
    with pytest.raises(BadRowError, match=r"b\.jsonl', row 3 \(id '1\d+'\): the title 'title' is empty"):
        build(source, tmp_path / "new", tiny_encoder, engine="ray", encoders=encoders)
    assert not (tmp_path / "new").exists() or not (tmp_path / "new" / "CURRENT").exists()
    # over an existing bundle: it stays as it was
    with build(make_catalogue().iloc[:5], tmp_path / "old", tiny_encoder) as old:
        before = old.generation
    with pytest.raises(BadRowError):
        build(source, tmp_path / "old", tiny_encoder, engine="ray", encoders=encoders, overwrite=True)
    with Matcher.load(tmp_path / "old", encoder=tiny_encoder) as again:
        assert (again.generation, len(again)) == (before, 5)


@pytest.mark.parametrize("encoders", [1, 2])
def test_bad_rows_skipped_on_ray_are_counted_as_locally(
    cluster: None, tmp_path: Path, tiny_encoder: Any, encoders: int
) -> None:
    df = make_catalogue()
    third = len(df) // 3
    df.loc[[1, third + 4, 2 * third - 1, len(df) - 1], "title"] = ""  # the middle and the very end of files
    source = split_files(tmp_path / "src", df)
    with (
        build(source, tmp_path / "local", tiny_encoder, skip_bad_rows=True) as local,
        build(source, tmp_path / "ray", tiny_encoder, engine="ray", encoders=encoders, skip_bad_rows=True) as on_ray,
    ):
        assert on_ray.manifest.source["skipped_rows"] == local.manifest.source["skipped_rows"] == 4
        pd.testing.assert_frame_equal(on_ray.catalogue(), local.catalogue())


def test_an_id_in_two_files_is_refused_naming_both(cluster: None, tmp_path: Path, tiny_encoder: Any) -> None:
    df = make_catalogue()
    df.loc[len(df) - 1, "id"] = df.loc[2, "id"]  # the last row of c.parquet repeats a row of a.csv
    source = split_files(tmp_path / "src", df)
    dup = df.loc[2, "id"]
    with pytest.raises(DuplicateIdError, match=rf"id '{dup}' is in '[^']*a\.csv' row 3 and again in '[^']*c\.parquet'"):
        build(source, tmp_path / "ray", tiny_encoder, engine="ray", encoders=1)
    with pytest.raises(
        DuplicateIdError, match=rf"c\.parquet' repeats ids .*'{dup}' \(row \d+\) first at '[^']*a\.csv' row 3"
    ):
        build(source, tmp_path / "local", tiny_encoder)


def test_ray_needs_files(tmp_path: Path, tiny_encoder: Any) -> None:
    with pytest.raises(ConfigError, match="reads files"):
        build(make_catalogue(), tmp_path / "b", tiny_encoder, engine="ray")
    with pytest.raises(ConfigError, match="encoders must be >= 1"):
        build(split_files(tmp_path / "src", make_catalogue()), tmp_path / "b", tiny_encoder, engine="ray", encoders=0)


@pytest.mark.parametrize(
    ("asked", "cpus", "gpus", "node_cpus", "plan"),
    [
        (None, 2, 0, 2, (2, 1, 0.0)),  # a CPU cluster: one one-thread actor per CPU
        (None, 16, 0, 8, (16, 1, 0.0)),
        (4, 16, 0, 8, (4, 4, 0.0)),  # fewer actors than CPUs: the CPUs shared out, within one node's
        (1, 16, 0, 8, (1, 8, 0.0)),
        (None, 8, 2, 8, (2, 4, 1.0)),  # one actor per GPU
        (4, 8, 2, 8, (4, 2, 0.5)),  # more actors than GPUs share them
    ],
)
def test_the_actor_plan(asked: int | None, cpus: int, gpus: int, node_cpus: int, plan: tuple[int, int, float]) -> None:
    assert distributed.actor_plan(asked, cpus=cpus, gpus=gpus, node_cpus=node_cpus) == plan


def test_a_read_is_cut_into_chunks_of_one_actor_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each part a read task puts out is one call of the actors (RAY_BATCH rows), whatever the reader's chunksize:
    with the reader's own chunks the calls came out unequal."""
    monkeypatch.setattr(distributed, "RAY_BATCH", 4)
    df = make_catalogue()
    df.to_csv(tmp_path / "one.csv", index=False)
    settings = {"id_column": "id", "title_column": "title", "skip_bad_rows": False, "chunksize": 7, "encoding": "utf-8"}
    parts = list(
        distributed.read_files({"index": np.array([0]), "file": np.array([str(tmp_path / "one.csv")])}, settings)
    )
    sizes = [len(part["id"]) for part in parts]
    assert sizes == [4] * (len(df) // 4) + ([len(df) % 4] if len(df) % 4 else [])
    assert [i for part in parts for i in part["id"]] == df["id"].astype(str).tolist()


def context_settings(ctx: Any) -> tuple[Any, ...]:
    """The Ray Data settings a build changes while it runs."""
    return (
        ctx.target_max_block_size,
        ctx.execution_options.preserve_order,
        ctx.enable_progress_bars,
        ctx._max_num_blocks_in_streaming_gen_buffer,
    )


def test_a_private_setting_this_ray_lacks_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """A Ray Data without one of the build's private settings (renamed by an upgrade) builds without it; a public
    setting is kept, so that a missing one fails the build."""
    ctx = types.SimpleNamespace(block=1, progress=True)
    asked = [(ctx, "block", 2), (ctx, "_renamed_buffer", 64), (ctx, "progress", False), (ctx, "order", True)]
    with caplog.at_level(logging.WARNING, logger="matching.distributed"):
        assert distributed.known_settings(asked) == [asked[0], asked[2], asked[3]]
    assert "_renamed_buffer" in caplog.text
    assert not hasattr(ctx, "_renamed_buffer")


def test_rows_reach_the_driver_batch_by_batch(
    cluster: None, tmp_path: Path, tiny_encoder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One file's rows come back in many small parts, in catalogue order (with Ray Data's default block size they
    came back as one block once the last row was encoded), and the build leaves Ray Data's settings as they were."""
    monkeypatch.setattr(distributed, "RAY_BATCH", 4)
    monkeypatch.setattr(distributed, "RAY_BLOCK_BYTES", 1)
    df = make_catalogue()
    df.to_csv(tmp_path / "one.csv", index=False)
    ctx = ray.data.DataContext.get_current()
    before = context_settings(ctx)
    settings = {"id_column": "id", "title_column": "title", "skip_bad_rows": False, "chunksize": 8, "encoding": "utf-8"}
    source = distributed.RaySource(tmp_path / "one.csv", settings, tiny_encoder, encoders=1)
    parts = list(source)
    assert len(parts) >= len(df) // 4
    assert [i for part in parts for i in part.ids] == df["id"].astype(str).tolist()
    vectors = np.concatenate([part.vectors for part in parts])
    np.testing.assert_allclose(vectors, tiny_encoder.encode_titles(df["title"].tolist()), rtol=0, atol=1e-5)
    assert context_settings(ctx) == before


def test_two_actors_share_one_files_rows(
    cluster: None, tmp_path: Path, tiny_encoder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-file catalogue is encoded by every actor (with the read fused into the actors' stage, the actor that
    read the file encoded all of it), and the rows still come back in catalogue order."""
    # both actors up before the first batch is handed out: else the first one up may encode all 25 tiny batches
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 120)
    monkeypatch.setattr(distributed, "RAY_BATCH", 4)
    monkeypatch.setattr(distributed, "RAY_BLOCK_BYTES", 1)
    df = make_catalogue()
    df.to_csv(tmp_path / "one.csv", index=False)
    settings = {"id_column": "id", "title_column": "title", "skip_bad_rows": False, "chunksize": 8, "encoding": "utf-8"}
    source = distributed.RaySource(tmp_path / "one.csv", settings, tiny_encoder, encoders=2)
    parts = list(source)
    assert [i for part in parts for i in part.ids] == df["id"].astype(str).tolist()
    vectors = np.concatenate([part.vectors for part in parts])
    np.testing.assert_allclose(vectors, tiny_encoder.encode_titles(df["title"].tolist()), rtol=0, atol=1e-5)
    record = source.record()
    assert record["encoders"] == 2
    assert record["threads_per_encoder"] == 1
    assert len(record["titles_per_second"]) == 2  # both actors encoded titles
