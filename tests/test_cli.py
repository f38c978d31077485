"""``python -m ckptbench`` through cli.main: runs, lists, and refuses bad arguments without writing."""

from __future__ import annotations

import pandas as pd
import pytest

from ckptbench import PRESETS, STRATEGIES, Benchmark, limits
from ckptbench.cli import main
from ckptbench.results import COLUMNS

VALID_STRATEGIES = "valid choices: " + ", ".join(STRATEGIES)
RUN = ["run", "--preset", "tiny", "--strategies", "pytorch,ts+chunks"]


def test_run_twice_prints_a_summary_and_appends(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*RUN, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "238 tensors" in printed
    lines = [line.split() for line in printed.splitlines()]
    for name in ("pytorch", "ts+chunks"):  # one table row each, verified (the log lines say "verified", not True)
        assert [words for words in lines if words[:1] == [name] and "True" in words], printed
    assert any(words[:1] == ["repeats"] for words in lines), printed  # the table's header
    assert str(out / "results.csv") in printed
    first = pd.read_csv(out / "results.csv")
    assert list(first.columns) == COLUMNS
    assert first["strategy"].tolist() == ["pytorch", "ts+chunks"]
    assert first["verified"].all()
    assert (first["tensors"] == 238).all()

    assert main([*RUN, "--out", str(out), "--no-warmup"]) == 0
    capsys.readouterr()
    second = pd.read_csv(out / "results.csv")
    assert len(second) == 2 * len(first)
    assert second.head(len(first)).equals(first)
    assert second["run_id"].nunique() == 2
    assert len(list((out / "runs").glob("*.json"))) == 2
    leftovers = [p.name for p in out.iterdir() if p.name in STRATEGIES or ".partial-" in p.name or "warmup" in p.name]
    assert leftovers == []


def test_run_with_repeats_and_kept_checkpoints(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "--preset", "tiny", "--strategies", "pytorch", "--out", str(out)]
    assert main([*argv, "--repeats", "2", "--keep-checkpoints", "--no-warmup", "--seed", "3"]) == 0
    capsys.readouterr()
    table = pd.read_csv(out / "results.csv")
    assert table["repeat"].tolist() == [0, 1]
    assert (out / "pytorch" / "model.pt").is_file()


def test_list_prints_every_strategy(capsys):
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0] for line in printed.splitlines()[1:]}
    assert set(STRATEGIES) <= rows
    assert printed.count("yes") == 8


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "existing-out"])
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--strategies", "pytorch,ts+magic"], ["unknown strategy 'ts+magic'", VALID_STRATEGIES]),
        (["--strategies", ""], ["unknown strategy", VALID_STRATEGIES]),
        (["--preset", "openllama-70b"], ["invalid choice: 'openllama-70b'", *PRESETS]),
        (["--repeats", "0"], ["--repeats must be at least 1"]),
        (["--repeats", "two"], ["invalid int value"]),
    ],
    ids=["strategy", "no-strategy", "preset", "repeats-0", "repeats-nan"],
)
def test_bad_arguments_exit_2_and_write_nothing(argv, expected, existing, tmp_path, capsys):
    out = tmp_path / "out"
    if existing:
        (out / "runs").mkdir(parents=True)
        (out / "results.csv").write_text("earlier results\n")
    before = sorted((str(p), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as info:
        main(["run", "--preset", "tiny", *argv, "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert sorted((str(p), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")) == before
    assert out.exists() == existing


def test_missing_model_path_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--model-path", str(tmp_path / "absent"), "--strategies", "pytorch", "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model directory")
    assert "does not exist" in err
    assert not out.exists()


def test_ctrl_c_exits_130(tmp_path, capsys, monkeypatch, fake_limits):
    monkeypatch.setattr(limits, "probe", lambda directory, size: fake_limits)

    def interrupted(self, name):
        raise KeyboardInterrupt

    monkeypatch.setattr(Benchmark, "run_phase", interrupted)
    assert main([*RUN, "--out", str(tmp_path / "out")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.partial-*"))


def test_a_phase_that_does_not_verify_exits_1(tmp_path, capsys, monkeypatch, fake_limits):
    from ckptbench import VerificationError

    monkeypatch.setattr(limits, "probe", lambda directory, size: fake_limits)
    real = Benchmark.run_phase

    def failing(self, name):
        if name == "ts+chunks":
            raise VerificationError("ts+chunks: made up")
        return real(self, name)

    monkeypatch.setattr(Benchmark, "run_phase", failing)
    assert main([*RUN, "--out", str(tmp_path / "out"), "--no-warmup"]) == 1
    captured = capsys.readouterr()
    assert "not verified: ts+chunks" in captured.err
    assert "pytorch" in captured.out
