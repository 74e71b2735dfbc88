"""The command line, driven in-process through ``matching.cli.main`` with the tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import hidden_entries, make_catalogue

from matching.cli import main
from matching.matcher import Matcher


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert needle in lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def catalogue_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-input") / "products.csv"
    make_catalogue().to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory: pytest.TempPathFactory, catalogue_csv: Path, tiny_model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("cli-bundles") / "products"
    assert main(["build", str(catalogue_csv), "--out", str(out), "--model", str(tiny_model_dir), "-q"]) == 0
    return out


# -- no heavy work ------------------------------------------------------------------------------------


@pytest.mark.parametrize("analyzer", ["chinese-chars", "cjk"])  # the choices come from the Analyzer enum
def test_build_takes_an_analyser_by_name(
    catalogue_csv: Path, tiny_model_dir: Path, tmp_path: Path, analyzer: str
) -> None:
    out = tmp_path / "b"
    argv = ["build", catalogue_csv, "--out", out, "--model", tiny_model_dir, "--analyzer", analyzer, "-q"]
    assert main([str(a) for a in argv]) == 0
    with Matcher.load(out) as m:
        assert (m.manifest.lexical or {})["analyzer"] == analyzer


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("build", "search", "evaluate", "info", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["build", "search", "evaluate", "info"])
def test_subcommand_help_exits_zero(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: matching {command}" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == "0.1.0"


def test_no_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys)
    assert code == 2
    assert "usage: matching" in out


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["search", "--no-such-flag"])
    assert info.value.code == 2


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, matching.cli; print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_the_cli_lock_timeout_is_the_bundle_default() -> None:
    from matching.bundle import DEFAULT_LOCK_TIMEOUT
    from matching.cli.options import LOCK_TIMEOUT

    assert LOCK_TIMEOUT == DEFAULT_LOCK_TIMEOUT


# -- build / search / info / evaluate -----------------------------------------------------------------


def test_build_prints_a_summary(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, catalogue_csv: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "bundle"
    code, stdout, _ = run(capsys, "build", catalogue_csv, "--out", out, "--model", tiny_model_dir, "-q")
    assert code == 0
    assert stdout.strip() == f"built {out}: 40 titles, dim 32, index Flat"
    assert (out / "CURRENT").is_file()
    assert hidden_entries(tmp_path) == []


def test_build_and_compact_with_an_index_backend(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, catalogue_csv: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "bundle"
    argv = ["build", catalogue_csv, "--out", out, "--model", tiny_model_dir, "-q", "--index-backend", "exact"]
    code, stdout, _ = run(capsys, *argv)
    assert code == 0
    assert stdout.strip() == f"built {out}: 40 titles, dim 32, index exact"
    code, stdout, _ = run(capsys, "compact", out, "--target-recall", "0.9", "-q")
    assert code == 0
    assert "index exact" in stdout
    code, stdout, _ = run(capsys, "compact", out, "--index-backend", "faiss", "-q")
    assert code == 0
    assert "index Flat" in stdout
    code, _, err = run(capsys, "compact", out, "--index-backend", "nope", "-q")
    assert code != 0
    assert_one_line_error(err, "unknown vector backend 'nope'")


def test_build_with_index_fields(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, catalogue_csv: Path, tiny_model_dir: Path
) -> None:
    from matching.bundle import current_generation
    from matching.store import Store

    columns = {}
    for name, flags in {"auto": [], "brand": ["--index-field", "brand"], "none": ["--index-field", "none"]}.items():
        out = tmp_path / name
        code, _, _ = run(capsys, "build", catalogue_csv, "--out", out, "--model", tiny_model_dir, "-q", *flags)
        assert code == 0
        store = Store.open(current_generation(out))
        assert store.fields is not None
        columns[name] = sorted(store.fields.columns)
        store.close()
    assert columns == {"auto": ["brand", "price"], "brand": ["brand"], "none": []}
    code, _, err = run(
        capsys,
        "build",
        catalogue_csv,
        "--out",
        tmp_path / "x",
        "--model",
        tiny_model_dir,
        "-q",
        "--index-field",
        "colour",
    )
    assert code != 0
    assert_one_line_error(err, "index field 'colour' holds no value in any row")


def test_build_with_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_model_dir: Path, tiny_encoder: Any
) -> None:
    source = tmp_path / "items.tsv"
    source.write_text(
        "sku\tbrand\tname\n1\tAcme\tyoga mat\n2\tGlobex\t\n3\tInitech\tdesk lamp\n4\t\t\n", encoding="utf-8"
    )
    out = tmp_path / "bundle"
    code, stdout, _ = run(
        capsys,
        "build",
        source,
        "--out",
        out,
        "--model",
        tiny_model_dir,
        "-q",
        "--id-column",
        "sku",
        "--title-column",
        "brand",
        "name",
        "--skip-bad-rows",
        "--factory",
        "HNSW8",
    )
    assert code == 0
    assert stdout.strip() == f"built {out}: 3 titles, dim 32, index HNSW8, 1 bad rows skipped"
    with Matcher.load(out, encoder=tiny_encoder) as matcher:
        assert matcher.manifest.source["title_columns"] == ["brand", "name"]
        assert sorted((h.id, h.title) for h in matcher.search("yoga", k=5)) == [
            (1, "Acme yoga mat"),
            (2, "Globex"),
            (3, "Initech desk lamp"),
        ]


def test_search_json_has_the_right_ids(
    capsys: pytest.CaptureFixture[str], cli_bundle: Path, tiny_model_dir: Path, tiny_encoder: Any
) -> None:
    query = "black wireless headphones"
    # the bundle was built with the default preset; querying with exact compares like with like
    args = ("-k", "5", "--json", "--model", tiny_model_dir, "--preset", "exact")
    code, stdout, _ = run(capsys, "search", cli_bundle, query, *args)
    assert code == 0
    payload = json.loads(stdout)
    with Matcher.load(cli_bundle, encoder=tiny_encoder) as matcher:
        expected = matcher.search(query, k=5)
    assert payload["query"] == query
    assert [m["id"] for m in payload["matches"]] == [h.id for h in expected]
    assert all(isinstance(m["id"], int) for m in payload["matches"])
    first = payload["matches"][0]
    assert set(first) == {"id", "title", "score", "retrieval_score", "dense_score", "lexical_score", "metadata"}
    assert first["title"] == expected[0].title
    assert first["metadata"] == expected[0].metadata
    assert first["score"] == pytest.approx(expected[0].score, abs=1e-6)


def test_search_json_with_several_queries_is_a_list(
    capsys: pytest.CaptureFixture[str], cli_bundle: Path, tiny_model_dir: Path
) -> None:
    titles = make_catalogue().set_index("id")["title"]
    code, stdout, _ = run(
        capsys,
        "search",
        cli_bundle,
        titles[1000],
        titles[1007],
        "-k",
        "1",
        "--json",
        "--no-rerank",
        "--model",
        tiny_model_dir,
    )
    assert code == 0
    payload = json.loads(stdout)
    assert [p["query"] for p in payload] == [titles[1000], titles[1007]]
    assert [p["matches"][0]["id"] for p in payload] == [1000, 1007]


def test_search_text_output(capsys: pytest.CaptureFixture[str], cli_bundle: Path) -> None:
    title = make_catalogue()["title"][0]
    code, stdout, _ = run(capsys, "search", cli_bundle, title, "-k", "2")  # encoder found from the manifest
    assert code == 0
    lines = stdout.strip().splitlines()
    assert lines[0] == f"query: {title}"
    assert len(lines) == 3
    assert lines[1].strip().startswith(f"1. 1.0000  [1000] {title}")
    assert '"brand": "Acme"' in lines[1]


def test_info(capsys: pytest.CaptureFixture[str], cli_bundle: Path, tiny_model_dir: Path) -> None:
    code, stdout, _ = run(capsys, "info", cli_bundle)
    assert code == 0
    info = json.loads(stdout)
    assert info["generation"] == "gen-000001"
    assert info["count"] == 40
    assert info["dim"] == 32
    assert info["id_type"] == "int"
    assert info["encoder"]["source"] == str(tiny_model_dir.resolve())
    assert info["indexed_fields"] == {"brand": "text", "price": "number"}
    assert "files" not in info
    assert "blocks" not in info


def test_info_with_files_and_verify(capsys: pytest.CaptureFixture[str], cli_bundle: Path) -> None:
    code, stdout, _ = run(capsys, "info", cli_bundle, "--files", "--verify")
    assert code == 0
    files = json.loads(stdout)["files"]
    assert {"store.sqlite", "vectors.f32", "index.faiss"} <= set(files)
    # the append-only vector file is checksummed in blocks: one digest over the blocks' digests
    assert all(len(digest.removeprefix("blocks:")) == 64 for digest in files.values())
    assert files["vectors.f32"].startswith("blocks:")


def test_evaluate_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, cli_bundle: Path, tiny_model_dir: Path
) -> None:
    catalogue = make_catalogue()
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        "".join(
            json.dumps({"_id": f"q{i}", "text": t}) + "\n"
            for i, t in zip(catalogue["id"], catalogue["title"], strict=True)
        ),
        encoding="utf-8",
    )
    qrels = tmp_path / "test.tsv"
    qrels.write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{i}\t1\n" for i in catalogue["id"]), encoding="utf-8"
    )
    code, stdout, _ = run(
        capsys,
        "evaluate",
        cli_bundle,
        "--queries",
        queries,
        "--qrels",
        qrels,
        "-k",
        "1",
        "10",
        "--json",
        "--model",
        tiny_model_dir,
    )
    assert code == 0
    report = json.loads(stdout)
    assert report["queries"] == 40
    assert report["retrieval"]["recall@10"] == 1.0
    assert report["retrieval"]["mrr@10"] == 1.0
    assert report["reranked"]["recall@1"] == 1.0

    code, stdout, _ = run(capsys, "evaluate", cli_bundle, "--queries", queries, "--qrels", qrels, "-k", "10")
    assert code == 0
    assert "recall@10" in stdout
    assert stdout.strip().endswith("(40 queries)")


# -- errors: exit code 1, one line on stderr, no traceback ---------------------------------------------


def test_build_with_a_missing_column(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, catalogue_csv: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "bundle"
    code, stdout, err = run(
        capsys,
        "build",
        catalogue_csv,
        "--out",
        out,
        "--model",
        tiny_model_dir,
        "-q",
        "--title-column",
        "name",
    )
    assert code == 1
    assert stdout == ""
    assert_one_line_error(err, "no column 'name'; its columns are ['id', 'title', 'brand', 'price']")
    assert not out.exists()
    assert hidden_entries(tmp_path) == []


def test_build_over_an_existing_bundle(
    capsys: pytest.CaptureFixture[str], cli_bundle: Path, catalogue_csv: Path, tiny_model_dir: Path
) -> None:
    code, _, err = run(capsys, "build", catalogue_csv, "--out", cli_bundle, "--model", tiny_model_dir, "-q")
    assert code == 1
    assert_one_line_error(err, "already exists")


def test_build_with_a_bad_model_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path, catalogue_csv: Path) -> None:
    code, _, err = run(capsys, "build", catalogue_csv, "--out", tmp_path / "b", "--model", tmp_path / "nope", "-q")
    assert code == 1
    assert_one_line_error(err, "does not exist")


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["search", "{missing}", "coffee"], id="search-missing-bundle"),
        pytest.param(["info", "{missing}"], id="info-missing-bundle"),
        pytest.param(
            ["evaluate", "{missing}", "--queries", "{missing}/q.jsonl", "--qrels", "{missing}/q.tsv"],
            id="evaluate-no-files",
        ),
    ],
)
def test_missing_bundle(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]) -> None:
    missing = tmp_path / "no-bundle"
    code, stdout, err = run(capsys, *(a.format(missing=missing) for a in argv))
    assert code == 1
    assert stdout == ""
    assert err.startswith("error: ")
    assert_one_line_error(err, "does not exist" if argv[0] != "evaluate" else "cannot read queries file")


def test_info_on_a_plain_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "info", tmp_path)
    assert code == 1
    assert_one_line_error(err, "not a bundle")


def test_evaluate_pairs_prints_every_signal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, cli_bundle: Path
) -> None:
    catalogue = make_catalogue()
    titles = catalogue["title"].tolist()
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame(
        {"q": [t.split(" ", 1)[1] for t in titles[:8]] * 2, "title": titles[:8] + titles[8:16], "y": [1] * 8 + [0] * 8}
    ).to_csv(pairs, index=False)
    code, stdout, _ = run(
        capsys, "evaluate", cli_bundle, "--pairs", pairs, "--query-column", "q", "--label-column", "y", "--json"
    )
    assert code == 0
    report = json.loads(stdout)
    assert report["metric"] == "roc_auc"
    assert report["pairs"] == 16
    assert set(report["signals"]) == {"cosine", "lexical", "fused", "reranker"}
    assert report["signals"]["fused"] == report["signals"]["reranker"]
    code, stdout, _ = run(
        capsys, "evaluate", cli_bundle, "--pairs", pairs, "--query-column", "q", "--label-column", "y"
    )
    assert code == 0
    assert stdout.splitlines()[0].split() == ["signal", "roc_auc"]
    code, _, stderr = run(capsys, "evaluate", cli_bundle, "--pairs", pairs, "--qrels", pairs)
    assert code != 0
    assert "not both" in stderr
    code, _, stderr = run(capsys, "evaluate", cli_bundle)
    assert code != 0
    assert "--pairs" in stderr
