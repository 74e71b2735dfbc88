"""Issue #14 classes fixed so far: generation names past six digits, links and folders that only look like
bundles, permissions from the umask, CURRENT files that are not text."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from matching import BundleError, Matcher
from matching.bundle import current_generation, is_bundle
from tests.conftest import make_catalogue


def one_row(i: int) -> pd.DataFrame:
    return pd.DataFrame([{"id": 90_000 + i, "title": f"hardening probe {i}", "brand": "Acme", "price": 1.0}])


def test_generations_go_past_gen_999999(own_bundle: Any, tiny_encoder: Any) -> None:
    path = own_bundle.path
    own_bundle.close()
    (path / "gen-000001").rename(path / "gen-999999")
    (path / "CURRENT").write_text("gen-999999\n", encoding="utf-8")
    with Matcher.load(path, encoder=tiny_encoder) as m:
        assert m.generation == "gen-999999"
        assert m.add(one_row(1), show_progress=False).generation == "gen-1000000"
        assert m.add(one_row(2), show_progress=False).generation == "gen-1000001"
    with Matcher.load(path, encoder=tiny_encoder) as again:
        assert again.generation == "gen-1000001"
        assert len(again) == 42
        assert again.search("hardening probe 2", 1, retrieval="lexical")[0].id == 90_002
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("gen-")) == ["gen-1000001"]


def test_a_folder_with_a_file_named_current_is_not_a_bundle(tmp_path: Path, tiny_encoder: Any) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "CURRENT").write_text("what I am working on\n", encoding="utf-8")
    assert not is_bundle(folder)
    with pytest.raises(BundleError, match="exists and is not a bundle"):
        Matcher.build(make_catalogue(), folder, encoder=tiny_encoder, overwrite=True, show_progress=False)
    assert (folder / "CURRENT").read_text(encoding="utf-8") == "what I am working on\n"


def test_current_that_is_not_text_is_a_clear_error(own_bundle: Any) -> None:
    path = own_bundle.path
    own_bundle.close()
    (path / "CURRENT").write_bytes(b"gen-\xff\xfe01\n")
    with pytest.raises(BundleError, match=r"cannot read .*CURRENT"):
        current_generation(path)
    with pytest.raises(BundleError):
        Matcher.load(path)


def test_garbage_collection_does_not_follow_a_generation_link(own_bundle: Any, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text("{}", encoding="utf-8")
    (elsewhere / "precious.txt").write_text("keep me", encoding="utf-8")
    os.symlink(elsewhere, own_bundle.path / "gen-000000")
    own_bundle.add(one_row(1), show_progress=False)  # a write collects old generations
    own_bundle.add(one_row(2), show_progress=False)
    assert (elsewhere / "precious.txt").read_text(encoding="utf-8") == "keep me"
    assert (elsewhere / "manifest.json").exists()


def test_a_live_generation_link_is_refused(own_bundle: Any, tmp_path: Path) -> None:
    path = own_bundle.path
    gen = current_generation(path)
    own_bundle.close()
    moved = tmp_path / "moved"
    gen.rename(moved)
    os.symlink(moved, gen)
    with pytest.raises(BundleError, match="not a complete generation"):
        current_generation(path)


@pytest.mark.parametrize(
    ("umask", "dirs", "files"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)]
)
def test_bundle_permissions_follow_the_umask(
    tmp_path: Path, tiny_encoder: Any, umask: int, dirs: int, files: int
) -> None:
    before = os.umask(umask)
    try:
        with Matcher.build(make_catalogue(), tmp_path / "b", encoder=tiny_encoder, show_progress=False) as m:
            m.add(one_row(1), show_progress=False)
            gen = current_generation(m.path)
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == dirs
    assert stat.S_IMODE(gen.stat().st_mode) == dirs
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in gen.iterdir()}
    assert modes == dict.fromkeys(modes, files), modes  # the scorer and BM25 weights included


def test_a_huge_k_or_candidates_is_bounded_by_the_catalogue(built_bundle: Any) -> None:
    import tracemalloc

    tracemalloc.start()
    hits = built_bundle.search("red shoes", k=10**9, candidates=10**12, where={"price": {">": 0}})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(hits) == 40
    assert peak < 50 * 2**20  # was ~7.5 GB for k=10**9 before the bound
    assert [h.id for h in built_bundle.search("red shoes", k=10**9)] == [
        h.id for h in built_bundle.search("red shoes", k=40)
    ]
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(Exception, match="k must be a whole number"):
            built_bundle.search("red shoes", k=bad)


def test_score_output_never_lands_in_a_bundle_or_on_a_directory(
    own_bundle: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from matching.cli import main

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("query,title\nred shoes,Acme red running shoes\n", encoding="utf-8")
    path = own_bundle.path
    gen = current_generation(path)
    before = {p.name: p.read_bytes() for p in [path / "CURRENT", *gen.iterdir()] if p.is_file()}
    for out in (path / "CURRENT", gen / "store.sqlite", gen / "scores.csv", path / "scores.csv"):
        assert main(["score", str(path), str(pairs), "--out", str(out), "-q"]) == 1
        assert "inside the bundle" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in [path / "CURRENT", *gen.iterdir()] if p.is_file()} == before
    assert main(["score", str(path), str(pairs), "--out", str(tmp_path), "-q"]) == 1
    assert "is a directory; give a file path" in capsys.readouterr().err
    assert main(["score", str(path), str(pairs), "--out", str(tmp_path / "scores.csv"), "-q"]) == 0


def test_demo_replaces_only_what_a_demo_wrote(own_bundle: Any, tmp_path: Path) -> None:
    from matching.demo import run_demo

    mine = tmp_path / "shop-catalogue.csv"
    mine.write_text("id,title\n1,my own precious catalogue\n", encoding="utf-8")
    with pytest.raises(BundleError, match="is not a demo catalogue"):
        run_demo(tmp_path / "shop", size=20, show_progress=False)
    assert mine.read_text(encoding="utf-8") == "id,title\n1,my own precious catalogue\n"
    target = own_bundle.path  # a bundle built from something else
    with pytest.raises(BundleError, match="the demo did not build"):
        run_demo(target, size=20, show_progress=False)
    assert len(Matcher.load(target, encoder=own_bundle.encoder)) == 40


def test_catalogue_values_round_trip_exactly(tmp_path: Path, tiny_encoder: Any) -> None:
    big = 2**53 + 1
    csv = tmp_path / "c.csv"
    csv.write_text(
        "id,title,code,count,price,flag,note,pi\n"
        f"1,red shoe,007,{big},1.50,true,NaN,3.14159265358979323846\n"
        "2,blue shoe,42,,2.25,FALSE,+5,1e3\n"
        "3,green hat,0,7,,false,,-0\n",
        encoding="utf-8",
    )
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(
        f'{{"id": {big}, "title": "red shoe", "count": {big}, "code": "007"}}\n'
        '{"id": 2, "title": "blue shoe"}\n'
        '{"id": 3, "title": "green hat", "count": 7}\n',
        encoding="utf-8",
    )
    with Matcher.build(csv, tmp_path / "b1", encoder=tiny_encoder, show_progress=False) as m:
        rows = {r["id"]: r for r in m.catalogue().to_dict("records")}
        assert rows[1]["code"] == "007"  # leading zero: text
        assert rows[1]["count"] == big
        assert isinstance(rows[1]["count"], int)
        assert rows[2]["count"] is None  # a gap is missing, not 0 or NaN
        assert rows[3]["count"] == 7
        assert isinstance(rows[3]["count"], int)
        assert (rows[1]["price"], rows[2]["price"]) == (1.5, 2.25)
        assert (rows[1]["flag"], rows[2]["flag"], rows[3]["flag"]) == (True, False, False)
        assert (rows[1]["note"], rows[2]["note"]) == ("NaN", "+5")  # not numbers as written: text
        assert rows[1]["pi"] == "3.14159265358979323846"  # more digits than a float holds: text
        assert (rows[2]["pi"], rows[3]["pi"]) == (1000.0, 0)  # numbers by value: 1e3 is 1000.0, -0 is 0
        assert m.search("red shoe", 3, where={"count": big})[0].id == 1
    with Matcher.build(jsonl, tmp_path / "b2", encoder=tiny_encoder, show_progress=False) as m:
        rows = {r["id"]: r for r in m.catalogue().to_dict("records")}
        assert set(rows) == {big, 2, 3}  # the id above 2**53 is exact, not rounded
        assert rows[big]["count"] == big
        assert rows[3]["count"] == 7
        assert isinstance(rows[3]["count"], int)
        assert rows[big]["code"] == "007"


def test_text_output_never_sends_escape_codes(
    tmp_path: Path, tiny_encoder: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from matching.cli import main

    df = pd.DataFrame([{"id": "evil\x1b]0;owned\x07", "title": "red \x1b[2Jshoe\x1b[31m", "note": "\x1b[1mbold"}])
    Matcher.build(df, tmp_path / "b", encoder=tiny_encoder, show_progress=False).close()
    assert main(["search", str(tmp_path / "b"), "red shoe"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "red \\x1b[2Jshoe\\x1b[31m" in out
    assert "[evil\\x1b]0;owned\\x07]" in out


def test_build_into_the_empty_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from matching.cli import main
    from tests.conftest import make_tiny_bert

    model = make_tiny_bert(tmp_path / "model")
    make_catalogue().to_csv(tmp_path / "c.csv", index=False)
    here = tmp_path / "here"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    assert main(["build", str(tmp_path / "c.csv"), "--out", ".", "--model", str(model), "-q"]) == 0
    assert "built .: 40 titles" in capsys.readouterr().out
    assert here.stat().st_ino == inode  # built in place: the working directory is still the same directory
    assert is_bundle(here)
    assert main(["search", ".", "acme", "-k", "1"]) == 0
