"""The docs' tables are generated from the registry and committed data, and the committed docs are current."""

from __future__ import annotations

import pytest

from ckptbench import STRATEGIES, docs
from ckptbench.errors import CkptbenchError
from ckptbench.study import EIGHT_WAY


def test_the_committed_docs_match_their_sources():
    assert docs.regenerate(check=True) == [], "run `python -m ckptbench docs` and commit the result"


def test_every_document_has_generated_blocks_and_they_render():
    for name in docs.DOCUMENTS:
        text = (docs.ROOT / name).read_text()
        specs = [m["spec"] for m in docs._BLOCK.finditer(text)]
        assert specs, name
        for spec in specs:
            assert docs.render(spec).startswith("| "), spec


def test_the_strategy_table_has_a_row_per_registered_strategy():
    table = docs.strategies_markdown().splitlines()
    assert len(table) == 2 + len(STRATEGIES)
    for name in STRATEGIES:
        assert sum(line.startswith(f"| `{name}` |") for line in table) == 1
    eight = docs.strategies_markdown("all").splitlines()
    assert [line.split(" | ")[0].strip("| `") for line in eight[2:]] == list(EIGHT_WAY)


def test_a_stale_block_is_found_and_rewritten(tmp_path, monkeypatch):
    document = tmp_path / "doc.md"
    document.write_text("before\n<!-- ckptbench:strategies all -->\n| hand-typed |\n<!-- /ckptbench -->\nafter\n")
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    assert docs.regenerate(check=True, documents=("doc.md",)) == [document]
    assert "hand-typed" in document.read_text()  # --check changes nothing
    assert docs.regenerate(documents=("doc.md",)) == [document]
    text = document.read_text()
    assert "hand-typed" not in text
    assert "| `ts+ocdbt` |" in text
    assert text.startswith("before\n")
    assert text.endswith("after\n")
    assert docs.regenerate(check=True, documents=("doc.md",)) == []


def test_an_unknown_block_is_an_error():
    with pytest.raises(CkptbenchError, match="unknown generated block"):
        docs.render("numbers-i-like")
