"""main.ipynb: runs headless end to end, re-runs one phase cell alone, and is committed clean."""

from __future__ import annotations

import html
import io
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest
from nbclient import NotebookClient
from PIL import Image

from ckptbench import EIGHT_WAY, STRATEGIES, read_results
from ckptbench.report import EXTENDED_STEM
from ckptbench.sweep import RESULTS_FILE

from conftest import NOTEBOOK, NOTEBOOK_TIMEOUT, tagged

FIGURE = "8way_performance_comparison"


@pytest.fixture(scope="module")
def executed(kernel_env, tmp_path_factory: pytest.TempPathFactory) -> tuple[nbformat.NotebookNode, Path]:
    """The whole notebook on the tiny preset, as papermill runs it."""
    work = tmp_path_factory.mktemp("notebook")
    out = work / "out"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(work / "executed.ipynb"),
        parameters={
            "PRESET": "tiny",
            "SWEEP_PRESET": "tiny",
            "OUT": str(out),
            "PROGRESS": False,
            "RANKS": [1, 2],
            "RANK_STRATEGIES": "ts+chunks",
        },
        kernel_name="python3",
        cwd=str(work),
        progress_bar=False,
        execution_timeout=NOTEBOOK_TIMEOUT,
    )
    return nbformat.read(work / "executed.ipynb", as_version=4), out


def _phase_cell(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    (cell,) = (cell for cell in tagged(nb, "phase") if f'"{name}"' in cell.source)
    return cell


def _png_and_svg_are_valid(directory: Path) -> None:
    png, svg = directory / f"{FIGURE}.png", directory / f"{FIGURE}.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.width >= 2000
    assert svg.read_text().lstrip().startswith("<?xml")
    assert "<svg" in svg.read_text()


@pytest.mark.slow
def test_the_whole_notebook_runs_headless(executed):
    nb, out = executed
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert errors == []
    assert [_phase_cell(nb, name).source for name in EIGHT_WAY] == [f'phase("{name}")' for name in EIGHT_WAY]

    extra = [name for name in STRATEGIES if name not in EIGHT_WAY]
    results = pd.read_csv(out / "results.csv")
    assert results["strategy"].tolist() == [*EIGHT_WAY, *extra]  # measured once each, none re-measured
    assert results["verified"].all()
    assert (results["tensors"] == 238).all()
    assert results["run_id"].nunique() == 1
    _png_and_svg_are_valid(out)
    assert (out / f"{EXTENDED_STEM}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = pd.read_csv(out / "summary.csv", index_col="strategy")
    assert summary.index.tolist() == [*EIGHT_WAY, *extra]
    swept = pd.read_csv(out / RESULTS_FILE)
    assert swept["strategy"].nunique() == 8  # 2 chunk sizes x sync on/off x 2 dtypes
    assert swept["verified"].all()


@pytest.mark.slow
def test_the_comparison_and_verdict_cells_show_their_tables_and_the_figure(executed):
    nb, _ = executed
    (comparison,) = tagged(nb, "comparison")
    assert "all 8 approaches measured" in "".join(o.get("text", "") for o in comparison.outputs)
    assert any("image/png" in o.get("data", {}) for o in comparison.outputs)
    assert any("ts+ocdbt" in o.get("data", {}).get("text/html", "") for o in comparison.outputs)
    (verdict,) = tagged(nb, "verdict")
    html = "".join(o.get("data", {}).get("text/html", "") for o in verdict.outputs)
    assert "every approach verified" in html
    assert "HELD" in html
    (measure,) = tagged(nb, "measure")
    assert "8 strategies x 1 repeats, interleaved order" in "".join(o.get("text", "") for o in measure.outputs)


@pytest.mark.slow
def test_the_ranks_section_measures_each_count_and_draws_time_against_ranks(executed):
    nb, out = executed
    (section,) = tagged(nb, "ranks")
    assert any("image/png" in o.get("data", {}) for o in section.outputs)
    assert "save s, 2->2 ranks" in html.unescape(_cell_html(section))
    ranked = read_results(out / "ranks.csv")  # the rank columns are one JSON field in the file
    assert ranked[["ranks", "load_ranks"]].values.tolist() == [[1, 1], [2, 2]]
    assert ranked["strategy"].tolist() == ["ts+chunks", "ts+chunks"]
    assert ranked["verified"].all()


def _cell_html(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs)


@pytest.mark.slow
def test_rendered_phase_outputs_are_compact_tables_not_truncated_frames(executed, tmp_path):
    """Rendered as a reader sees it: each phase shows seconds, GB, files and verified in a small table."""
    from nbconvert import HTMLExporter

    nb, _ = executed
    body, _ = HTMLExporter().from_notebook_node(nb)
    (tmp_path / "main.html").write_text(body)
    assert "Traceback" not in body
    for name in EIGHT_WAY:
        table = pd.read_html(io.StringIO(_cell_html(_phase_cell(nb, name))), index_col=0)[0]
        assert list(table.columns) == ["save s", "cold load s", "warm load s", "size GB", "files", "verified"]
        assert table.index.tolist() == [f"{name} [1]"]
        assert table["verified"].tolist() == ["yes"]
        assert len(table.columns) <= 7
        cell_text = _cell_html(_phase_cell(nb, name))
        assert "…" not in cell_text
        assert "..." not in cell_text
        for number in table[["save s", "cold load s", "warm load s", "size GB"]].astype(str).to_numpy().ravel():
            digits = number.replace(",", "").replace(".", "").lstrip("0")
            assert len(digits) <= 3, number  # three significant digits, not six decimals
    (comparison,) = tagged(nb, "comparison")
    summary = pd.read_html(io.StringIO(_cell_html(comparison)), index_col=0)[0]
    assert {"save s", "size GB", "files", "verified"} <= set(summary.columns)
    assert "bytes" not in summary.columns


@pytest.mark.slow
def test_one_phase_cell_runs_alone_and_replaces_its_rows(kernel_env, tmp_path):
    """Parameters, setup, then the t5x cell twice: the session keeps one set of rows, the CSV both."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    out = tmp_path / "out"
    (parameters,) = tagged(nb, "parameters")
    parameters.source += f'\nPRESET = "tiny"\nSTRATEGIES = "t5x"\nOUT = {str(out)!r}\nPROGRESS = False'
    (approaches,) = tagged(nb, "approaches")
    (setup,) = tagged(nb, "setup")
    t5x, pytorch = _phase_cell(nb, "t5x"), _phase_cell(nb, "pytorch")
    probe = nbformat.v4.new_code_cell("print(len(bench.results), sorted(set(bench.results['strategy'])))")
    cells = [parameters, approaches, setup, t5x, t5x, pytorch, probe]

    client = NotebookClient(
        nb, kernel_name="python3", timeout=NOTEBOOK_TIMEOUT, resources={"metadata": {"path": str(tmp_path)}}
    )
    printed = []
    with client.setup_kernel():
        for index, cell in enumerate(cells):
            cell.outputs = []
            client.execute_cell(cell, index)
            printed.append("".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream"))

    assert "skipped pytorch: not in 't5x'" in printed[5]
    assert printed[6].strip() == "1 ['t5x']"
    results = pd.read_csv(out / "results.csv")
    assert results["strategy"].tolist() == ["t5x", "t5x"]
    assert results["run_id"].nunique() == 1
    assert results["verified"].all()


def test_the_committed_notebook_is_clean_and_parameterised():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert code[0].metadata.get("tags") == ["parameters"]
    names = {line.split("=")[0].strip() for line in code[0].source.splitlines()}
    assert names == {
        "PRESET",
        "STRATEGIES",
        "REPEATS",
        "ORDER",
        "OUT",
        "KEEP_CHECKPOINTS",
        "PROGRESS",
        "LOAD_INTO",
        "PAYLOAD",
        "DISK_PROFILE",
        "DISK_LIMIT",
        "EXTRA",
        "SWEEP_PRESET",
        "SWEEP_KNOBS",
        "STORE",
        "S3_ENDPOINT",
        "S3_RTT_MS",
        "CLOUD_RTT_MS",
        "CLOUD_CONCURRENCY",
        "RANKS",
        "LOAD_RANKS",
        "RANK_STRATEGIES",
    }
    assert len(tagged(nb, "phase")) == len(EIGHT_WAY)
    assert nb.metadata.kernelspec.name == "python3"
