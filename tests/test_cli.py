"""``python -m ckptbench`` through cli.main: runs, lists, verifies, and refuses bad arguments without writing."""

from __future__ import annotations

import pandas as pd
import pytest

from ckptbench import PRESETS, STRATEGIES, TorchSave, limits
from ckptbench.cli import main
from ckptbench.results import HEADER
from ckptbench.strategies.orbax import SUBFOLDER, describe
from ckptbench.study import ASYNC, GROUPS

from conftest import FAKE_LIMITS, leftovers, save_checkpoint, written

VALID_STRATEGIES = "valid choices: " + ", ".join([*GROUPS, *STRATEGIES])
RUN = ["run", "--preset", "tiny", "--strategies", "pytorch,ts+chunks", "--no-drift"]


@pytest.fixture
def quick_probe(monkeypatch):
    monkeypatch.setattr(limits, "measured", lambda directory, settings, **kwargs: FAKE_LIMITS)


@pytest.mark.slow
def test_run_twice_prints_a_summary_and_appends(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*RUN, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "238 tensors" in printed
    assert "interleaved order" in printed
    lines = [line.split() for line in printed.splitlines()]
    for name in ("pytorch", "ts+chunks"):  # one summary row each, verified
        assert [words for words in lines if words[:1] == [name] and words[-1] == "yes"], printed
    assert str(out / "results.csv") in printed
    first = pd.read_csv(out / "results.csv")
    assert list(first.columns) == HEADER
    assert first["strategy"].tolist() == ["pytorch", "ts+chunks"]
    assert first["verified"].all()

    assert main([*RUN, "--out", str(out), "--no-warmup"]) == 0
    assert written(capsys.readouterr().out) == written(printed)
    second = pd.read_csv(out / "results.csv")
    assert len(second) == 2 * len(first)
    assert second.head(len(first)).equals(first)
    assert second["run_id"].nunique() == 2
    assert len(list((out / "runs").glob("*.json"))) == 2
    assert leftovers(out) == sorted(["results.csv", *written(printed)])  # no checkpoint, nothing partial


def test_run_with_repeats_and_kept_checkpoints(tmp_path, capsys, quick_probe):
    out = tmp_path / "out"
    argv = ["run", "--preset", "tiny", "--strategies", "pytorch", "--out", str(out), "--no-drift"]
    assert main([*argv, "--repeats", "2", "--keep-checkpoints", "--no-warmup", "--seed", "3"]) == 0
    capsys.readouterr()
    assert pd.read_csv(out / "results.csv")["repeat"].tolist() == [0, 1]
    assert (out / "pytorch" / "model.pt").is_file()
    assert main(["verify", str(out / "pytorch")]) == 0
    assert "pytorch checkpoint, 238 tensors, intact" in capsys.readouterr().out


def test_list_prints_every_strategy_and_its_markdown_table(capsys):
    assert main(["list", "--wide"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0] for line in printed.splitlines()[2:]}
    assert set(STRATEGIES) <= rows
    assert printed.count("yes") == 8
    assert main(["list", "--markdown"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| name | 8-way |")
    assert len(table) == 2 + len(STRATEGIES)
    assert all(f"| `{name}` |" in "\n".join(table) for name in STRATEGIES)


def test_list_shows_orbax_and_the_async_saves_with_what_orbax_wrote(tiny, tmp_path, capsys):
    path = tmp_path / "ckpt"
    save_checkpoint(STRATEGIES["orbax+uncompressed"], tiny.tensors, path)
    stored = describe(path / SUBFOLDER, next(iter(tiny.tensors)))
    assert main(["list", "--wide"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert {"orbax", "orbax+uncompressed", *ASYNC} <= set(lines)
    assert all(value in lines["orbax+uncompressed"] for value in stored.values())
    assert all("async" in lines[name].removeprefix(name).lower() for name in ASYNC)  # the save knob says so


@pytest.mark.slow
def test_run_every_strategy_on_tiny_measures_and_verifies_each(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--preset", "tiny", "--strategies", "every", "--out", str(out), "--no-drift"]) == 0
    assert "blocking s" in capsys.readouterr().out
    results = pd.read_csv(out / "results.csv")
    assert results["strategy"].tolist() == list(STRATEGIES)
    assert results["verified"].all()
    assert (results["load_into"] == "fresh").all()
    synchronous = ~results["strategy"].isin(ASYNC)
    assert (results.loc[synchronous, "save_blocking_s"] == results.loc[synchronous, "save_s"]).all()
    assert (results.loc[~synchronous, "save_blocking_s"] < results.loc[~synchronous, "save_s"]).all()


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "existing-out"])
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--strategies", "pytorch,ts+magic"], ["unknown strategy 'ts+magic'", VALID_STRATEGIES]),
        (["--strategies", ""], ["unknown strategy", VALID_STRATEGIES]),
        (["--preset", "openllama-70b"], ["invalid choice: 'openllama-70b'", *PRESETS]),
        (["--repeats", "0"], ["repeats must be at least 1"]),
        (["--repeats", "two"], ["invalid int value"]),
        (["--seed", "-5"], ["seed must be 0 or more"]),
        (["--order", "random"], ["invalid choice: 'random'"]),
        (["--load-into", "live"], ["invalid choice: 'live'", "fresh", "existing"]),
    ],
    ids=["strategy", "no-strategy", "preset", "repeats-0", "repeats-nan", "seed", "order", "load-into"],
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


def test_out_that_is_a_file_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        main([*RUN, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "not a folder"


def test_missing_model_path_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--model-path", str(tmp_path / "absent"), "--strategies", "pytorch", "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model directory")
    assert err.count("\n") == 1
    assert not out.exists()


def test_ctrl_c_during_a_save_exits_130_keeps_earlier_rows_and_no_partial(tmp_path, capsys, monkeypatch, quick_probe):
    saves = []

    def interrupted(self, tensors, directory, progress):
        saves.append(directory.folder)
        (directory.folder / "model.pt").write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(TorchSave, "save", interrupted)
    out = tmp_path / "out"
    argv = ["run", "--preset", "tiny", "--strategies", "ts+chunks,pytorch", "--out", str(out), "--no-warmup"]
    assert main([*argv, "--no-drift"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(saves) == 1
    assert ".partial-" in saves[0].name
    assert not saves[0].exists()
    assert leftovers(out) == ["results.csv"]
    assert pd.read_csv(out / "results.csv")["strategy"].tolist() == ["ts+chunks"]


def test_a_phase_that_does_not_verify_exits_1_after_the_others_ran(tmp_path, capsys, monkeypatch, quick_probe):
    real = TorchSave.read

    def flipped(self, path, entries):
        tensors = real(self, path, entries)
        tensors["lm_head.weight"].view(-1)[0] += 1
        return tensors

    monkeypatch.setattr(TorchSave, "read", flipped)
    assert main([*RUN, "--out", str(tmp_path / "out"), "--no-warmup"]) == 1
    captured = capsys.readouterr()
    assert "error: pytorch: pytorch: a load did not match" in captured.err
    assert "ts+chunks" in captured.out
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    assert results.set_index("strategy")["verified"].to_dict() == {"pytorch": False, "ts+chunks": True}
    assert (tmp_path / "out" / "8way_performance_comparison.png").is_file()


def test_verify_exit_codes(tmp_path, capsys, saved):
    assert main(["verify", str(saved["ts+chunks"].path)]) == 0
    assert "intact" in capsys.readouterr().out
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "absent")]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["verify", str(saved["ts+chunks"].path), "--strategy", "nope"])
    assert info.value.code == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err


def test_plot_of_a_binary_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "results.csv").write_bytes(b"\x00\x01\x02\xff")
    assert main(["plot", "--results", str(tmp_path / "results.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:")
    assert "not a ckptbench results file" in err
    assert err.count("\n") == 1
