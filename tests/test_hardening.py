"""Issue #14 classes fixed so far: generation names past six digits, links and folders that only look like
bundles, permissions from the umask, CURRENT files that are not text."""

from __future__ import annotations

import contextlib
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


# -- class 2: links, damage, paths; class 7: messages -------------------------------------------------------


def _search_ids(path: Path, encoder: Any) -> list[Any]:
    with Matcher.load(path, encoder=encoder) as m:
        return [[h.id for h in m.search(q, 5)] for q in ("acme red coffee maker", "blue lamp")]


def test_hard_linked_copies_do_not_damage_each_other(own_bundle: Any, tmp_path: Path, tiny_encoder: Any) -> None:
    import shutil

    original = own_bundle.path
    own_bundle.close()
    copy = tmp_path / "copy"
    shutil.copytree(original, copy, copy_function=os.link)  # cp -al
    before = _search_ids(original, tiny_encoder)
    with Matcher.load(copy, encoder=tiny_encoder) as c:
        c.add(one_row(1), show_progress=False)
        with pytest.raises(Exception, match="already"):  # a failed write, after the editor opened the store
            c.add(pd.DataFrame([{"id": 1000, "title": "x"}]), show_progress=False)
    with Matcher.load(original, encoder=tiny_encoder) as o:  # verify=True: every checksum of the original holds
        o.add(one_row(2), show_progress=False)
        assert len(o) == 41
    assert _search_ids(original, tiny_encoder)[1] == before[1]
    with Matcher.load(copy, encoder=tiny_encoder) as c:
        assert len(c) == 41
        assert c.search("hardening probe 1", 1, retrieval="lexical")[0].id == 90_001


def test_a_bundle_file_that_is_a_symlink_is_refused_before_any_write(own_bundle: Any, tmp_path: Path) -> None:
    gen = current_generation(own_bundle.path)
    victim = tmp_path / "victim.bin"
    (gen / "vectors.f32").rename(victim)
    os.symlink(victim, gen / "vectors.f32")
    size = victim.stat().st_size
    with pytest.raises(BundleError, match=r"vectors\.f32' is a symbolic link"):
        own_bundle.add(one_row(1), show_progress=False)
    assert victim.stat().st_size == size  # not truncated, not appended to
    with pytest.raises(BundleError, match="symbolic link"):
        Matcher.load(own_bundle.path)


@pytest.mark.parametrize("name", ["store.sqlite", "vectors.f32", "index.faiss", "lexical.safetensors"])
@pytest.mark.parametrize("delta", [True, False])
def test_a_damaged_file_is_not_blessed_by_the_next_write(
    own_bundle: Any, name: str, delta: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change written whole refuses damage in any file it reads; one kept as a delta reads only the delta, the
    store's pages it looks up and the vectors' last block, and carries the other files with their digests: the
    damage is still refused by the next verified load, never blessed."""
    if not delta:
        monkeypatch.setattr("matching.changes._keeps_delta", lambda live: False)
    gen = current_generation(own_bundle.path)
    data = bytearray((gen / name).read_bytes())
    data[len(data) // 2] ^= 0x40
    (gen / name).write_bytes(bytes(data))
    if delta and name in ("index.faiss", "lexical.safetensors"):
        with contextlib.suppress(BundleError):  # published; the matcher's own refresh may read the damage
            own_bundle.add(one_row(1), show_progress=False)
    else:
        with pytest.raises(BundleError, match=rf"{name}. is damaged"):
            own_bundle.add(one_row(1), show_progress=False)
        assert current_generation(own_bundle.path) == gen
    with pytest.raises(BundleError, match=rf"{name}. is damaged"):
        Matcher.load(own_bundle.path)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m["files"].update({"../../etc/passwd": "0" * 64}), "plain names"),
        (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "plain names"),
        (lambda m: m.update(dim="384"), "field 'dim'"),
        (lambda m: m.update(count=-1), "dim and count must be >= 0"),
        (lambda m: m.update(encoder=["x"]), "field 'encoder'"),
        (lambda m: m["sizes"].update({"store.json": "12"}), "sizes whole numbers"),
        (lambda m: m.update(count=m["count"] + 1), "its own checksum"),
        (lambda m: m["lexical"].update(known_power=0), "'known_power' is 0, not a number in .1, 10."),
        (lambda m: m["lexical"].update(dense_floor=float("nan")), "'dense_floor' is nan"),
        (lambda m: m["lexical"].update(dense_span="15"), "'dense_span' is '15'"),
        (lambda m: m["lexical"].update(dense_weight=True), "'dense_weight' is True"),
        (lambda m: m["lexical"].update(fusion="mean"), "'fusion' is 'mean', not one of"),
        (lambda m: m["lexical"].update(fusion=["adaptive"]), r"'fusion' is \['adaptive'\], not one of"),
    ],
)
def test_a_crafted_or_damaged_manifest_is_refused(own_bundle: Any, edit: Any, needle: str) -> None:
    import json

    path = current_generation(own_bundle.path) / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)
    if needle != "its own checksum":
        manifest.pop("checksum")  # a crafted manifest without a self-checksum (as bundles before it) is type-checked
    path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(BundleError, match=needle):
        Matcher.load(own_bundle.path)


def test_a_manifest_of_other_bytes_is_a_message(own_bundle: Any) -> None:
    path = current_generation(own_bundle.path) / "manifest.json"
    path.write_bytes(b'{"dim": "\xff\xfe"}')
    with pytest.raises(BundleError, match=r"cannot read .*manifest.json"):
        Matcher.load(own_bundle.path)


def test_a_crafted_scorer_config_allocates_nothing_before_refusal(own_bundle: Any) -> None:
    import json
    import tracemalloc

    path = current_generation(own_bundle.path) / "scorer.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["hidden"] = 1_000_000
    path.write_text(json.dumps(config), encoding="utf-8")
    from matching.scorer import Scorer

    tracemalloc.start()
    with pytest.raises(BundleError, match="disagree"):
        Scorer.load(path.parent)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20


def test_a_write_that_runs_out_of_space_is_a_message_and_keeps_the_bundle(
    own_bundle: Any, tiny_model_dir: Path
) -> None:
    import subprocess
    import sys

    own_bundle.close()
    script = (
        "import resource, signal, sys\n"
        "import pandas as pd\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from matching.cli import main\n"
        "pd.DataFrame([{'id': 5000 + i, 'title': 'filler title number %d' % i} for i in range(3000)])"
        ".to_csv(sys.argv[2], index=False)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # files may not grow past 200 kB\n"
        "sys.exit(main(['add', sys.argv[1], sys.argv[2], '-q']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(own_bundle.path), str(own_bundle.path.parent / "more.csv")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "Nothing was published; the bundle is as it was" in done.stderr
    with Matcher.load(own_bundle.path) as m:  # every checksum holds
        assert len(m) == 40


def test_non_utf8_paths_on_the_command_line_are_messages(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = os.fsencode(str(tmp_path)) + b"/caf\xe9-bundle"
    done = subprocess.run([sys.executable.encode(), b"-m", b"matching", b"info", bad], capture_output=True, check=False)
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr
    assert b"does not exist" in done.stderr


# -- the property: damage is reported by name, or nothing different is served ----------------------------------

QUERIES = ("acme red coffee maker", "blue desk lamp", "globex yoga mat")


def _answers(m: Matcher) -> list[Any]:
    return [len(m)] + [[(h.id, h.title, round(h.score, 6), h.metadata) for h in m.search(q, 5)] for q in QUERIES]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> tuple[Path, list[Any]]:
    path = tmp_path_factory.mktemp("pristine") / "b"
    with Matcher.build(make_catalogue(), path, encoder=tiny_encoder, show_progress=False) as m:  # hybrid
        return path, _answers(m)


def test_random_byte_damage_is_reported_by_name_or_never_served(
    pristine: tuple[Path, list[Any]], tiny_encoder: Any
) -> None:
    import shutil
    import tempfile

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from matching import MatchingError

    path, expected = pristine
    gen = current_generation(path)
    files = ["CURRENT", *sorted(f"{gen.name}/{p.name}" for p in gen.iterdir())]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.data())
    def damage(data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(files), label="file")
        work = Path(tempfile.mkdtemp())
        try:
            copy = work / "b"
            shutil.copytree(path, copy)
            target = copy / name
            raw = bytearray(target.read_bytes())
            at = data.draw(st.integers(0, len(raw) - 1), label="offset")
            raw[at] ^= data.draw(st.integers(1, 255), label="xor")
            target.write_bytes(bytes(raw))
            try:
                m = Matcher.load(copy, encoder=tiny_encoder)
            except MatchingError as exc:
                assert Path(name).name in str(exc), f"damage to {name} reported without naming it: {exc}"  # noqa: PT017 (a damage may also be harmless)
                return
            with m:
                assert _answers(m) == expected, f"damage to {name} at byte {at} was served"
        finally:
            shutil.rmtree(work, ignore_errors=True)

    damage()


@pytest.mark.parametrize(
    "config",
    [
        {"count": 40, "rows": 10**15, "dim": 32, "id_type": "int"},
        {"count": -1, "rows": 40, "dim": 32, "id_type": "int"},
        {"count": 40, "rows": 40, "dim": 0, "id_type": "int"},
        {"count": 40, "rows": 40, "dim": 32, "id_type": "float"},
        {"count": "x", "rows": 40, "dim": 32, "id_type": "int"},
    ],
)
def test_crafted_store_sizes_are_refused(own_bundle: Any, config: dict[str, Any]) -> None:
    import json

    from matching.store import Store

    gen = current_generation(own_bundle.path)
    (gen / "store.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(BundleError, match=r"cannot read store config|vectors\.f32. holds .* the file is damaged"):
        Store.open(gen)


def test_a_faiss_index_with_a_crafted_size_is_a_message(own_bundle: Any) -> None:
    from matching.vectors import VectorIndex

    gen = current_generation(own_bundle.path)
    raw = bytearray((gen / "index.faiss").read_bytes())
    # the header's ntotal (after the 4-byte fourcc and 4-byte d): claim 2**60 vectors
    raw[8:16] = (2**60).to_bytes(8, "little")
    (gen / "index.faiss").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="cannot read FAISS index"):
        VectorIndex.load(gen)


# -- review follow-ups ----------------------------------------------------------------------------------------


def test_a_killed_build_in_place_leaves_a_folder_the_next_build_takes(tmp_path: Path, tiny_encoder: Any) -> None:
    here = tmp_path / "here"
    (here / "gen-000001").mkdir(parents=True)  # renamed into place, CURRENT never written
    (here / ".gen-000002.staging-abc").mkdir()
    (here / ".CURRENT.tmp").write_text("gen-000001\n", encoding="utf-8")
    with Matcher.build(make_catalogue(), here, encoder=tiny_encoder, show_progress=False) as m:
        assert (m.generation, len(m)) == ("gen-000001", 40)
    assert sorted(p.name for p in here.iterdir()) == ["CURRENT", "gen-000001"]


def test_a_bundle_with_a_damaged_current_can_be_rebuilt_with_overwrite(own_bundle: Any, tiny_encoder: Any) -> None:
    path = own_bundle.path
    own_bundle.close()
    (path / "CURRENT").write_bytes(b"\xff\xfe")
    with pytest.raises(BundleError):
        Matcher.build(make_catalogue(), path, encoder=tiny_encoder, show_progress=False)
    with Matcher.build(make_catalogue(), path, encoder=tiny_encoder, show_progress=False, overwrite=True) as m:
        assert len(m) == 40


def test_a_change_under_another_umask_leaves_published_files_alone(tmp_path: Path, tiny_encoder: Any) -> None:
    before = os.umask(0o022)
    try:
        m = Matcher.build(make_catalogue(), tmp_path / "b", encoder=tiny_encoder, show_progress=False)
        os.umask(0o077)
        m.add(one_row(1), show_progress=False)
        m.close()
    finally:
        os.umask(before)
    gen = current_generation(tmp_path / "b")
    # carried by hard link from the first generation: the mode it was published with stays
    assert stat.S_IMODE((gen / "scorer.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((gen / "vectors.f32").stat().st_mode) == 0o644
    assert stat.S_IMODE((gen / "store.sqlite").stat().st_mode) == 0o644  # the base store, carried
    assert stat.S_IMODE((gen / "delta.sqlite").stat().st_mode) == 0o600  # written by this change


def test_queries_with_lone_surrogates_are_messages(built_bundle: Any) -> None:
    from matching import ConfigError

    with pytest.raises(ConfigError, match="lone surrogate"):
        built_bundle.search("red \ud800 shoes")
    with pytest.raises(ConfigError, match=r"titles\[0\] holds a lone surrogate"):
        built_bundle.score_pairs(["red shoes"], ["red \udc80 shoes"])
