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


def answers(m: Matcher, **search: Any) -> list[Any]:
    queries = ("acme red", "blue desk lamp")
    return [[(h.id, h.title, round(h.score, 6)) for h in m.search(q, 5, **search)] for q in queries]


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
        lexical = dict(m.manifest.lexical or {})
        new_sum = lexical.pop("dense_sum")  # the catalogue's mean cosine follows the new vectors
        assert new_sum == pytest.approx(np.asarray(m.snapshot.store.vectors, dtype=np.float64).sum(axis=0).tolist())
        assert lexical == {k: v for k, v in pinned.manifest.lexical.items() if k != "dense_sum"} | {
            "retrieval": lexical["retrieval"]
        }
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


KILLER = """
import sys, torch
torch.set_num_threads(1)
from matching import Matcher
from matching.config import EncoderConfig
from matching.encoder import Encoder
encoder = Encoder.from_pretrained(EncoderConfig(model=sys.argv[2], preset="exact"))
with Matcher.load(sys.argv[1], verify=False) as m:
    print("begin", flush=True)
    m.reencode(encoder=encoder, show_progress=False)
print("end", flush=True)
"""


def test_a_writer_killed_during_reencode_leaves_the_old_or_the_new_encoding(
    tmp_path: Path, tiny_encoder: Encoder, other_encoder: Encoder, tiny_model_dir: Path, other_model_dir: Path
) -> None:
    """SIGKILL a `reencode` process at random moments: the bundle always loads with checksums verified and is
    wholly one encoding (fingerprint, vectors and index agree), with the same rows."""
    import random
    import subprocess
    import sys
    import time

    df = pd.concat([make_catalogue()] * 40, ignore_index=True)
    df["id"] = range(len(df))
    df["title"] = [f"{t} {i}" for i, t in enumerate(df["title"])]
    Matcher.build(df, tmp_path / "b", encoder=tiny_encoder, show_progress=False, preset="exact").close()
    titles = df["title"].tolist()
    expected = {e.fingerprint: e.encode_titles(titles) for e in (tiny_encoder, other_encoder)}
    model_of = {tiny_encoder.fingerprint: other_model_dir, other_encoder.fingerprint: tiny_model_dir}
    script = tmp_path / "killer.py"
    script.write_text(KILLER, encoding="utf-8")
    rng = random.Random(7)
    root = Path(__file__).resolve().parent.parent
    duration, outcomes, landed = 0.0, [], 0
    for attempt in range(6):
        with Matcher.load(tmp_path / "b", verify=True) as m:  # every checksum checked
            fingerprint = m.manifest.encoder["fingerprint"]
            assert fingerprint in expected
            assert m.catalogue()["title"].tolist() == titles
            live = m.store.live_ids()
            assert m.index.ntotal == len(live) == len(titles)
            np.testing.assert_allclose(m.store.vectors[live], expected[fingerprint], atol=1e-5)
            _, found = m.index.search(expected[fingerprint][:50], 1)
            assert found[:, 0].tolist() == live[:50].tolist()  # the index holds the same vectors
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "b"), str(model_of[fingerprint])],
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "begin"
        started = time.perf_counter()
        if attempt == 0:  # the first runs to the end: how long a re-encode takes here
            assert proc.wait(timeout=120) == 0
            duration = time.perf_counter() - started
            outcomes.append("finished")
            continue
        time.sleep(rng.uniform(0, duration))
        landed += proc.poll() is None  # still writing when killed
        proc.kill()
        proc.wait(timeout=60)
        with Matcher.load(tmp_path / "b", verify=True) as m:
            outcomes.append("after" if m.manifest.encoder["fingerprint"] != fingerprint else "before")
    assert landed >= 3, outcomes  # most kills hit a writer mid-re-encode (each draws a moment within its run)


@pytest.mark.parametrize("retrieval", ["dense", "lexical"])
def test_reencode_keeps_the_retrieval_fusion_of_a_dense_or_lexical_bundle(
    tmp_path: Path, tiny_encoder: Encoder, other_encoder: Encoder, retrieval: str
) -> None:
    """Such a bundle's reranker has a fixed weight (1 or 0) beside the adaptive fusion of its hybrid retrieval: a
    re-encode keeps both, as a fresh build with the new encoder has them."""
    path = tmp_path / "b"
    build = {"encoder": tiny_encoder, "retrieval": retrieval, "show_progress": False}
    with Matcher.build(make_catalogue(), path, **build) as m:
        m.reencode(encoder=other_encoder, show_progress=False)
        fresh = Matcher.build(make_catalogue(), tmp_path / "fresh", **{**build, "encoder": other_encoder})
        assert m.scorer.config == fresh.scorer.config
        ours, theirs = dict(m.manifest.lexical or {}), dict(fresh.manifest.lexical or {})
        assert ours.pop("dense_sum") == pytest.approx(theirs.pop("dense_sum"))
        assert ours == theirs
        assert ours["fusion"] == "adaptive"
        assert answers(m, retrieval="hybrid") == answers(fresh, retrieval="hybrid")
        fresh.close()
