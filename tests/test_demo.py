from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from matching.demo import DEMO_QUERIES, generate_catalogue, run_demo


def test_generated_catalogue_is_reproducible_and_distinct() -> None:
    a, b = generate_catalogue(500, seed=3), generate_catalogue(500, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 500
    assert a["title"].is_unique
    assert a["id"].is_unique
    assert list(a.columns) == ["id", "title", "brand", "category", "price"]
    assert not generate_catalogue(500, seed=4)["title"].equals(a["title"])


def test_generator_refuses_more_titles_than_it_can_make() -> None:
    with pytest.raises(ValueError, match="distinct titles"):
        generate_catalogue(10**7)


@pytest.mark.minilm
def test_demo_builds_and_answers_each_query(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_demo(tmp_path / "demo", size=300, show_progress=False)
    out = capsys.readouterr().out
    assert (tmp_path / "demo-catalogue.csv").is_file()
    assert (tmp_path / "demo" / "CURRENT").is_file()
    for query in DEMO_QUERIES:
        assert f"query: {query}" in out
    assert "headphones" in out.split("query: laptop")[0]  # the first query's hits are audio products
