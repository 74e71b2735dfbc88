"""Re-encoding a bundle with another encoder: same rows, new vectors, zero downtime for readers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from matching import BundleError, Matcher
from matching.config import EncoderConfig
from matching.encoder import Encoder
from tests.conftest import make_catalogue


@pytest.fixture(scope="module")
def other_encoder(other_model_dir: Path) -> Encoder:
    return Encoder.from_pretrained(EncoderConfig(model=str(other_model_dir), preset="exact"))


def answers(m: Matcher) -> list[Any]:
    return [[(h.id, h.title, round(h.score, 6)) for h in m.search(q, 5)] for q in ("acme red", "blue desk lamp")]


def test_reencode_keeps_the_rows_and_moves_to_the_new_vectors(
    tmp_path: Path, tiny_encoder: Encoder, other_encoder: Encoder
) -> None:
    with Matcher.build(make_catalogue(), tmp_path / "b", encoder=tiny_encoder, show_progress=False) as m:
        before = m.catalogue()
        old_fingerprint = m.manifest.encoder["fingerprint"]
        pinned = m.pin()
        pinned_answers = answers(pinned)
        m.reencode(encoder=other_encoder, show_progress=False)
        pd.testing.assert_frame_equal(m.catalogue(), before)  # ids, titles, metadata identical
        assert m.manifest.encoder["fingerprint"] == other_encoder.fingerprint != old_fingerprint
        record = m.manifest.source["reencoded"]
        assert record["from_fingerprint"] == old_fingerprint
        assert record["scorer"].startswith("reset")
        assert not m.scorer.trained
        titles = before["title"].tolist()
        live = m.store.live_ids()
        np.testing.assert_allclose(m.store.vectors[live], other_encoder.encode_titles(titles), atol=1e-5)
        assert m.manifest.lexical == pinned.manifest.lexical | {"retrieval": m.manifest.lexical["retrieval"]}
        assert answers(pinned) == pinned_answers  # a reader pinned to the old generation answers as before
    with (
        Matcher.build(make_catalogue(), tmp_path / "fresh", encoder=other_encoder, show_progress=False) as fresh,
        Matcher.load(tmp_path / "b", encoder=other_encoder) as again,
    ):
        assert answers(again) == answers(fresh)  # the same as building with the new encoder


def test_readers_never_fail_while_a_bundle_is_reencoded(
    tmp_path: Path, tiny_encoder: Encoder, other_encoder: Encoder
) -> None:
    df = pd.concat([make_catalogue()] * 5, ignore_index=True)
    df["id"] = range(len(df))
    df["title"] = [f"{t} {i}" for i, t in enumerate(df["title"])]
    Matcher.build(df, tmp_path / "b", encoder=tiny_encoder, show_progress=False).close()
    errors: list[str] = []
    seen: set[str] = set()
    stop = threading.Event()

    def read() -> None:
        with Matcher.load(tmp_path / "b", encoder=tiny_encoder, allow_encoder_mismatch=True) as r:
            while not stop.is_set():
                try:
                    if len(r.search("acme red", 5)) != 5:
                        errors.append("short")
                    seen.add(str(r.generation))
                    r.refresh()
                except Exception as exc:
                    errors.append(repr(exc))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    with Matcher.load(tmp_path / "b", encoder=tiny_encoder) as writer:
        writer.reencode(encoder=other_encoder, show_progress=False)
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert "gen-000001" in seen


def test_reencode_is_refused_when_another_writer_published_since(
    tmp_path: Path, tiny_encoder: Encoder, other_encoder: Encoder
) -> None:
    Matcher.build(make_catalogue(), tmp_path / "b", encoder=tiny_encoder, show_progress=False).close()
    with (
        Matcher.load(tmp_path / "b", encoder=tiny_encoder) as a,
        Matcher.load(tmp_path / "b", encoder=tiny_encoder) as b,
    ):
        b.add(pd.DataFrame([{"id": 1, "title": "teal teapot"}]), show_progress=False)
        with pytest.raises(BundleError, match="changed since"):
            a.reencode(encoder=other_encoder, show_progress=False)


def test_cli_reencode(tmp_path: Path, tiny_encoder: Encoder, other_model_dir: Path, capsys: Any) -> None:
    from matching.cli import main

    Matcher.build(make_catalogue(), tmp_path / "b", encoder=tiny_encoder, show_progress=False).close()
    assert main(["reencode", str(tmp_path / "b"), "--model", str(other_model_dir), "--preset", "exact", "-q"]) == 0
    out = capsys.readouterr().out
    assert "re-encoded" in out
    assert "40 titles" in out
    with Matcher.load(tmp_path / "b") as m:
        assert m.manifest.source["reencoded"]["from_fingerprint"] == tiny_encoder.fingerprint
