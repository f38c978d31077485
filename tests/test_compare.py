"""``compare``: two runs side by side, a contradiction named with exit 1, agreement exit 0, calibration printed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from ckptbench import compare, report
from ckptbench.cli import main
from ckptbench.results import read_results

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "docs/results/2026-11-30-openllama-3b-training-orbax/bench.csv"
"""A committed full-size bench: seven strategies, three interleaved rounds."""
TIMINGS = ["save_s", "save_blocking_s", "load_cold_s", "load_warm_s"]


def test_identical_runs_agree_and_every_interval_holds_the_other_median(tmp_path, capsys):
    copy = tmp_path / "bench.csv"
    shutil.copy(RUN, copy)
    assert main(["compare", str(RUN), str(copy), "--figure", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "the runs agree" in printed
    assert "CONTRADICTION" not in printed
    held, total = compare.compare(*(report.select_run(read_results(p)) for p in (RUN, copy))).calibration()
    assert held == total > 0
    assert f"calibration: {total} of {total} medians' intervals hold the other run's median (100%" in printed
    assert (tmp_path / f"{compare.FIGURE_STEM}.png").stat().st_size > 0


def _planted(tmp_path: Path, factor: float) -> Path:
    planted = pd.read_csv(RUN)
    planted.loc[planted["strategy"] == "ts+best", TIMINGS] *= factor
    planted.to_csv(tmp_path / "slow.csv", index=False)
    return tmp_path / "slow.csv"


def test_one_strategy_three_times_slower_is_named_as_a_contradiction(tmp_path, capsys):
    """x3 on one strategy leaves the widened verdicts INCONCLUSIVE (this machine's between-run spread of ratios is
    about x/÷ 1.7 each way at full size), but it flips verdicts on the rounds' intervals by a move no A/A pair
    explains: a contradiction, exit 1."""
    slow = _planted(tmp_path, 3)
    assert main(["compare", str(RUN), str(slow)]) == 1
    printed = capsys.readouterr().out
    assert "rounds alone: 3 contradictions (exit 1)" in printed
    assert "CONTRADICTION: target 'ts+best cold load / safetensors cold load <= 1': MET: 0.851" in printed
    table = compare.compare(report.select_run(read_results(RUN)), report.select_run(read_results(slow)))
    named = table.within.contradictions
    assert "target 'ts+best cold load / safetensors cold load <= 1': MET in A, MISSED in B" in named
    assert any(c.startswith("'fastest load at inference, into fresh memory (cold load s)': ts+best") for c in named)
    assert all("a move the A/A pairs do not explain" in c for c in table.contradictions)
    slowed = table.within.medians[table.within.medians["strategy"] == "ts+best"]
    assert slowed["B / A"].tolist() == pytest.approx([3.0] * len(slowed))
    assert not slowed["A covers B"].any()
    assert table.medians.loc[table.medians["strategy"] == "pytorch", "A covers B"].all()


AA_PAIRS = [p for p in sorted(ROOT.glob("docs/results/*-aa*/bench.csv")) if pd.read_csv(p)["run_id"].nunique() == 2]
"""Every committed A/A pair (a folder whose second run was refused holds one run and is not a pair)."""


def test_the_committed_aa_pairs_are_found():
    assert len(AA_PAIRS) >= 8


@pytest.mark.parametrize("path", AA_PAIRS, ids=lambda p: p.parent.name)
def test_no_committed_aa_pair_contradicts_itself(path):
    """The move test must not fire on two runs of one command, the pairs held out of the spread included."""
    results = read_results(path)
    a, b = (results[results["run_id"] == run] for run in results["run_id"].unique())
    comparison = compare.compare(a, b)
    assert comparison.agree, comparison.contradictions


def test_one_strategy_ten_times_slower_is_named_as_a_contradiction(tmp_path, capsys):
    assert main(["compare", str(RUN), str(_planted(tmp_path, 10))]) == 1
    printed = capsys.readouterr().out
    assert "CONTRADICTION: target 'ts+best save / orbax save <= 1': MET in A, MISSED in B" in printed


def test_one_file_and_two_run_ids(tmp_path, capsys):
    both = pd.concat([pd.read_csv(RUN), pd.read_csv(RUN).assign(run_id="again")])
    both.to_csv(tmp_path / "bench.csv", index=False)
    assert main(["compare", str(tmp_path / "bench.csv"), "20261130-102550-404dfe", "again"]) == 0
    assert "A = 20261130-102550-404dfe, B = again" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "bench.csv"), "20261130-102550-404dfe", "nope"]) == 1
    assert "no run 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(tmp_path / "bench.csv"), "again"])
    assert exit_.value.code == 2
    assert "again is not a file" in capsys.readouterr().err


def test_the_notebook_compares_a_session_with_the_stored_run_of_its_preset():
    stored = report.select_run(read_results(RUN.parents[1] / "2026-11-30-openllama-3b-2l/results.csv"))
    against = compare.with_stored(stored, "openllama-3b-2l")
    assert against.agree
    assert against.calibration()[0] == against.calibration()[1] > 0
    assert compare.with_stored(stored, "tiny") is None
