"""The Matcher facade: exact search, reloads, batch search, and safe (atomic) builds and rebuilds."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import assert_same_ranking, hidden_entries, make_catalogue

from matching.bundle import MANIFEST_FILE, POINTER_FILE, current_generation
from matching.config import EncoderConfig, IndexConfig
from matching.encoder import Encoder
from matching.errors import BadRowError, BundleError, ConfigError
from matching.matcher import Matcher
from matching.types import Match

QUERIES = [
    "black wireless headphones",
    "Acme coffee maker",
    "a yoga mat for the park",
    "a man is riding a horse",
    "grey",
]
QUERY_IDS = ["headphones", "coffee-maker", "yoga-mat", "unrelated", "one-word"]


def brute_force(matcher: Matcher, query: str, k: int) -> tuple[list[Any], list[float]]:
    """Ids and cosine scores of the ``k`` best titles by a NumPy scan of the stored vectors."""
    q = matcher.encoder.encode_queries([query])[0].astype(np.float64)
    scores = np.asarray(matcher.store.vectors, dtype=np.float64) @ q
    order = np.argsort(-scores, kind="stable")[:k]
    rows = matcher.store.get(order.tolist())
    return [matcher.store.external_id(r.external_id) for r in rows], scores[order].tolist()


def build(source: Any, path: Path, encoder: Encoder, **kwargs: Any) -> Matcher:
    return Matcher.build(source, path, encoder=encoder, show_progress=False, **{"retrieval": "dense", **kwargs})


def generations(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("gen-"))


def as_tuples(hits: list[Match]) -> list[tuple[Any, str, float, float]]:
    return [(h.id, h.title, h.score, h.retrieval_score) for h in hits]


# -- search ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 40], ids=lambda k: f"k-{k}")
@pytest.mark.parametrize("query", QUERIES, ids=QUERY_IDS)
def test_search_equals_brute_force_cosine(built_bundle: Matcher, query: str, k: int) -> None:
    hits = built_bundle.search(query, k=k)
    expected_ids, expected_scores = brute_force(built_bundle, query, k)
    assert len(hits) == k
    assert_same_ranking(
        [h.id for h in hits], [h.retrieval_score for h in hits], expected_ids, expected_scores, atol=1e-5
    )
    # An untrained scorer scores exactly as cosine does.
    np.testing.assert_allclose([h.score for h in hits], [h.retrieval_score for h in hits], atol=1e-6, rtol=0)


@pytest.mark.parametrize("query", QUERIES, ids=QUERY_IDS)
def test_search_without_rerank_equals_brute_force(built_bundle: Matcher, query: str) -> None:
    hits = built_bundle.search(query, k=10, rerank=False)
    expected_ids, expected_scores = brute_force(built_bundle, query, 10)
    assert [h.score for h in hits] == [h.retrieval_score for h in hits]
    assert_same_ranking([h.id for h in hits], [h.score for h in hits], expected_ids, expected_scores, atol=1e-5)


def test_a_title_finds_itself_with_its_row(built_bundle: Matcher) -> None:
    catalogue = make_catalogue()
    row = catalogue.iloc[17]
    top = built_bundle.search(row["title"], k=3)[0]
    assert top.id == row["id"]
    assert isinstance(top.id, int)
    assert top.title == row["title"]
    assert top.metadata == {"brand": row["brand"], "price": row["price"]}
    assert top.retrieval_score == pytest.approx(1.0, abs=1e-5)


def test_reloading_gives_identical_results(built_bundle: Matcher, tiny_encoder: Encoder) -> None:
    assert built_bundle.path is not None
    with Matcher.load(built_bundle.path, encoder=tiny_encoder) as again:
        assert len(again) == len(built_bundle)
        for query in QUERIES:
            assert again.search(query, k=7) == built_bundle.search(query, k=7)


def test_reloading_finds_the_encoder_from_the_manifest(built_bundle: Matcher, tiny_model_dir: Path) -> None:
    assert built_bundle.path is not None
    assert built_bundle.manifest.encoder["source"] == str(tiny_model_dir.resolve())
    with Matcher.load(built_bundle.path) as again:
        assert again.encoder.fingerprint == built_bundle.encoder.fingerprint
        assert again.search(QUERIES[0], k=5) == built_bundle.search(QUERIES[0], k=5)


def test_search_batch_equals_per_query_search(built_bundle: Matcher) -> None:
    batch = built_bundle.search_batch(QUERIES, k=8)
    assert len(batch) == len(QUERIES)
    for query, hits in zip(QUERIES, batch, strict=True):
        single = built_bundle.search(query, k=8)
        assert_same_ranking(
            [h.id for h in hits],
            [h.score for h in hits],
            [h.id for h in single],
            [h.score for h in single],
            1e-5,
        )
        np.testing.assert_allclose(
            [h.retrieval_score for h in hits], [h.retrieval_score for h in single], atol=1e-5, rtol=0
        )
        single_by_id = {h.id: h for h in single}
        for h in hits:
            if h.id in single_by_id:
                assert (h.title, h.metadata) == (single_by_id[h.id].title, single_by_id[h.id].metadata)


def test_search_batch_of_no_queries(built_bundle: Matcher) -> None:
    assert built_bundle.search_batch([], k=3) == []


def test_search_vectors_with_stored_vectors(built_bundle: Matcher) -> None:
    vectors = np.asarray(built_bundle.store.vectors[[3, 11]])
    results = built_bundle.search_vectors(vectors, k=1)
    catalogue = make_catalogue()
    assert [hits[0].id for hits in results] == [catalogue["id"][3], catalogue["id"][11]]


@pytest.mark.parametrize("k", [40, 41, 1000], ids=lambda k: f"k-{k}")
def test_k_larger_than_the_catalogue_returns_every_title(built_bundle: Matcher, k: int) -> None:
    hits = built_bundle.search("coffee", k=k)
    assert len(hits) == 40
    assert sorted(h.id for h in hits) == sorted(make_catalogue()["id"].tolist())
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_candidates_below_k_still_gives_k(built_bundle: Matcher) -> None:
    assert len(built_bundle.search("coffee", k=6, candidates=2)) == 6


@pytest.mark.parametrize("k", [0, -1], ids=["k-0", "k-negative"])
def test_k_below_one_is_a_config_error(built_bundle: Matcher, k: int) -> None:
    with pytest.raises(ConfigError, match="k must be a whole number >= 1"):
        built_bundle.search("coffee", k=k)


def test_search_batch_rejects_a_bare_string(built_bundle: Matcher) -> None:
    with pytest.raises(ConfigError, match="list of queries"):
        built_bundle.search_batch("coffee maker")


def test_search_batch_rejects_non_strings(built_bundle: Matcher) -> None:
    with pytest.raises(ConfigError, match="item 1 is int"):
        built_bundle.search_batch(["coffee", 3])  # type: ignore[list-item]


def test_info_and_repr(built_bundle: Matcher) -> None:
    info = built_bundle.info()
    assert info["path"] == str(built_bundle.path)
    assert info["count"] == 40
    assert info["indexed_fields"] == {"brand": "text", "price": "number"}
    assert info["dim"] == 32
    assert info["id_type"] == "int"
    # "auto" resolved for 40 titles: exact Flat, nothing to tune or refine
    assert info["index"] == {
        "backend": "faiss",
        "factory": "Flat",
        "nprobe": None,
        "ef_search": None,
        "refine_factor": None,
        "memory_budget": None,
        "target_recall": 0.95,
        "requested_factory": "auto",
    }
    assert info["source"]["skipped_rows"] == 0
    assert set(info["files"]) >= {"store.sqlite", "vectors.f32", "index.faiss", "scorer.safetensors"}
    assert repr(built_bundle) == f"Matcher(path={str(built_bundle.path)!r}, count=40, index='Flat')"


def test_build_with_an_ivf_index(tmp_path: Path, tiny_encoder: Encoder) -> None:
    config = IndexConfig(factory="IVF2,Flat", nprobe=2)
    with build(make_catalogue(), tmp_path / "ivf", tiny_encoder, index_config=config) as matcher:
        assert matcher.manifest.index == {**config.to_dict(), "requested_factory": "IVF2,Flat"}
        hits = matcher.search(QUERIES[0], k=5)
        expected_ids, expected_scores = brute_force(matcher, QUERIES[0], 5)
    assert_same_ranking([h.id for h in hits], [h.retrieval_score for h in hits], expected_ids, expected_scores, 1e-5)


# -- building over existing bundles --------------------------------------------------------------------


@pytest.fixture
def small_bundle(tmp_path: Path, tiny_encoder: Encoder) -> Path:
    path = tmp_path / "indexes" / "products"
    build(make_catalogue().head(12), path, tiny_encoder).close()
    return path


def snapshot(path: Path, encoder: Encoder) -> list[list[tuple[Any, str, float, float]]]:
    with Matcher.load(path, encoder=encoder) as matcher:
        return [as_tuples(hits) for hits in matcher.search_batch(QUERIES, k=5)]


def test_a_fresh_build_has_one_generation_and_no_leftovers(small_bundle: Path) -> None:
    assert generations(small_bundle) == ["gen-000001"]
    assert (small_bundle / POINTER_FILE).read_text(encoding="utf-8").strip() == "gen-000001"
    assert hidden_entries(small_bundle) == []
    assert hidden_entries(small_bundle.parent) == []


def test_building_over_a_bundle_without_overwrite_fails_and_keeps_it(small_bundle: Path, tiny_encoder: Encoder) -> None:
    before = snapshot(small_bundle, tiny_encoder)
    files_before = sorted(p.relative_to(small_bundle) for p in small_bundle.rglob("*"))
    with pytest.raises(BundleError, match="already exists"):
        build(make_catalogue(), small_bundle, tiny_encoder)
    assert sorted(p.relative_to(small_bundle) for p in small_bundle.rglob("*")) == files_before
    assert snapshot(small_bundle, tiny_encoder) == before


def test_failed_rebuild_with_overwrite_keeps_the_previous_bundle(small_bundle: Path, tiny_encoder: Encoder) -> None:
    before = snapshot(small_bundle, tiny_encoder)
    bad = make_catalogue()
    bad.loc[30, "title"] = "   "  # a later row, in a later chunk than the first
    with pytest.raises(BadRowError, match=r"row 31"):
        build(bad, small_bundle, tiny_encoder, overwrite=True, chunksize=8)
    assert generations(small_bundle) == ["gen-000001"]
    assert (small_bundle / POINTER_FILE).read_text(encoding="utf-8").strip() == "gen-000001"
    assert hidden_entries(small_bundle) == []
    assert hidden_entries(small_bundle.parent) == []
    with Matcher.load(small_bundle, encoder=tiny_encoder) as matcher:
        assert len(matcher) == 12
    assert snapshot(small_bundle, tiny_encoder) == before


def test_successful_rebuild_with_overwrite_replaces_the_bundle(small_bundle: Path, tiny_encoder: Encoder) -> None:
    with build(make_catalogue(), small_bundle, tiny_encoder, overwrite=True) as matcher:
        assert len(matcher) == 40
        assert matcher.manifest.count == 40
    assert generations(small_bundle) == ["gen-000002"]
    assert current_generation(small_bundle).name == "gen-000002"
    assert hidden_entries(small_bundle) == []
    with Matcher.load(small_bundle, encoder=tiny_encoder) as matcher:
        assert len(matcher) == 40
        assert len(matcher.search("coffee", k=100)) == 40


def test_an_open_matcher_keeps_working_across_a_rebuild(small_bundle: Path, tiny_encoder: Encoder) -> None:
    with Matcher.load(small_bundle, encoder=tiny_encoder) as old:
        before = as_tuples(old.search(QUERIES[1], k=5))
        build(make_catalogue(), small_bundle, tiny_encoder, overwrite=True).close()
        assert as_tuples(old.search(QUERIES[1], k=5)) == before


def test_building_into_an_existing_empty_directory(tmp_path: Path, tiny_encoder: Encoder) -> None:
    path = tmp_path / "empty"
    path.mkdir()
    with build(make_catalogue().head(5), path, tiny_encoder) as matcher:
        assert len(matcher) == 5
    assert generations(path) == ["gen-000001"]
    assert hidden_entries(tmp_path) == []


def test_building_into_a_non_bundle_directory_is_refused(tmp_path: Path, tiny_encoder: Encoder) -> None:
    path = tmp_path / "notes"
    path.mkdir()
    (path / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(BundleError, match="not a bundle"):
        build(make_catalogue(), path, tiny_encoder, overwrite=True)
    assert [p.name for p in path.iterdir()] == ["keep.txt"]


def test_building_onto_a_file_is_refused(tmp_path: Path, tiny_encoder: Encoder) -> None:
    path = tmp_path / "bundle"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(BundleError, match="is a file"):
        build(make_catalogue(), path, tiny_encoder)
    assert path.read_text(encoding="utf-8") == "x"


# -- loading -------------------------------------------------------------------------------------------


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nothing-here"


def _plain_dir(tmp_path: Path) -> Path:
    path = tmp_path / "plain"
    path.mkdir()
    (path / "data.csv").write_text("id,title\n", encoding="utf-8")
    return path


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "bundle.faiss"
    path.write_bytes(b"\x00" * 8)
    return path


def _bad_pointer(tmp_path: Path) -> Path:
    path = tmp_path / "bad-pointer"
    path.mkdir()
    (path / POINTER_FILE).write_text("gen-000009\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        pytest.param(_missing, "does not exist", id="missing-path"),
        pytest.param(_plain_dir, "not a bundle", id="plain-directory"),
        pytest.param(_a_file, "is a file", id="file"),
        pytest.param(_bad_pointer, "not a complete generation", id="dangling-pointer"),
    ],
)
def test_loading_what_is_not_a_bundle_is_a_bundle_error(
    tmp_path: Path, tiny_encoder: Encoder, make: Any, needle: str
) -> None:
    with pytest.raises(BundleError, match=needle):
        Matcher.load(make(tmp_path), encoder=tiny_encoder)


@pytest.fixture
def bundle_copy(built_bundle: Matcher, tmp_path: Path) -> Path:
    assert built_bundle.path is not None
    copy = tmp_path / "copy"
    shutil.copytree(built_bundle.path, copy)
    return copy


@pytest.mark.parametrize("name", ["store.sqlite", "vectors.f32", "index.faiss", "scorer.safetensors"])
def test_a_damaged_file_is_a_bundle_error_naming_it(bundle_copy: Path, tiny_encoder: Encoder, name: str) -> None:
    with (current_generation(bundle_copy) / name).open("r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=rf"{name}.*damaged"):
        Matcher.load(bundle_copy, encoder=tiny_encoder)


def test_a_missing_file_is_a_bundle_error_naming_it(bundle_copy: Path, tiny_encoder: Encoder) -> None:
    (current_generation(bundle_copy) / "index.faiss").unlink()
    with pytest.raises(BundleError, match=r"index\.faiss.*missing"):
        Matcher.load(bundle_copy, encoder=tiny_encoder)


def test_a_truncated_vector_file_is_caught_even_without_checksums(bundle_copy: Path, tiny_encoder: Encoder) -> None:
    vectors = current_generation(bundle_copy) / "vectors.f32"
    os.truncate(vectors, vectors.stat().st_size - 1)
    with pytest.raises(BundleError, match=r"vectors\.f32.*damaged"):
        Matcher.load(bundle_copy, encoder=tiny_encoder, verify=False)


def test_a_manifest_from_a_newer_library_is_refused(bundle_copy: Path, tiny_encoder: Encoder) -> None:
    manifest = current_generation(bundle_copy) / MANIFEST_FILE
    text = re.sub(r'"format_version": \d+', '"format_version": 99', manifest.read_text(encoding="utf-8"))
    manifest.write_text(text, encoding="utf-8")
    with pytest.raises(BundleError, match="newer"):
        Matcher.load(bundle_copy, encoder=tiny_encoder)


def test_a_copied_bundle_searches_the_same(bundle_copy: Path, built_bundle: Matcher, tiny_encoder: Encoder) -> None:
    with Matcher.load(bundle_copy, encoder=tiny_encoder) as copy:
        assert copy.search(QUERIES[2], k=5) == built_bundle.search(QUERIES[2], k=5)


def test_loading_with_another_encoder_is_a_bundle_error(built_bundle: Matcher, other_model_dir: Path) -> None:
    assert built_bundle.path is not None
    other = Encoder.from_pretrained(EncoderConfig(model=str(other_model_dir)))
    with pytest.raises(BundleError, match="allow_encoder_mismatch"):
        Matcher.load(built_bundle.path, encoder=other)
    with pytest.raises(BundleError, match="fingerprint"):
        Matcher.load(built_bundle.path, model=other_model_dir)


def test_loading_with_another_encoder_is_allowed_when_asked(built_bundle: Matcher, other_model_dir: Path) -> None:
    assert built_bundle.path is not None
    other = Encoder.from_pretrained(EncoderConfig(model=str(other_model_dir)))
    with Matcher.load(built_bundle.path, encoder=other, allow_encoder_mismatch=True) as matcher:
        assert matcher.encoder is other
        hits = matcher.search(QUERIES[0], k=40)
    # The stored title vectors are unchanged; only the query side differs.
    assert sorted(h.id for h in hits) == sorted(make_catalogue()["id"].tolist())


def test_loading_with_another_pooling_is_a_bundle_error(built_bundle: Matcher, tiny_model_dir: Path) -> None:
    assert built_bundle.path is not None
    cls = Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), pooling="cls"))  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="not the one bundle"):
        Matcher.load(built_bundle.path, encoder=cls)


def test_dataframe_and_csv_sources_build_the_same_bundle(tmp_path: Path, tiny_encoder: Encoder) -> None:
    df = make_catalogue()
    csv = tmp_path / "catalogue.csv"
    df.to_csv(csv, index=False)
    with (
        build(df, tmp_path / "from-df", tiny_encoder) as a,
        build(csv, tmp_path / "from-csv", tiny_encoder) as b,
    ):
        np.testing.assert_array_equal(np.asarray(a.store.vectors), np.asarray(b.store.vectors))
        assert a.search(QUERIES[0], k=5) == b.search(QUERIES[0], k=5)
        assert b.manifest.source["name"] == str(csv)
        assert a.manifest.source["name"] == "DataFrame"


def test_metadata_with_missing_values_round_trips_as_null(tmp_path: Path, tiny_encoder: Encoder) -> None:
    df = pd.DataFrame({"id": ["a", "b"], "title": ["yoga mat", "desk lamp"], "price": [1.5, float("nan")]})
    with build(df, tmp_path / "b", tiny_encoder) as matcher:
        hits = {h.id: h for h in matcher.search("desk lamp", k=2)}
    assert hits["a"].metadata == {"price": 1.5}
    assert hits["b"].metadata == {"price": None}
