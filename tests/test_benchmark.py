"""The harness end to end on the tiny model: rows, results store, environment, kept checkpoints, re-runs."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

import ckptbench
from ckptbench import Benchmark, TorchSave, UnknownChoiceError, VerificationError, get_strategy
from ckptbench.results import COLUMNS
from ckptbench.verify import verify

TWO = ["pytorch", "ts+chunks"]


def _ignore(nbytes: int) -> None:
    pass


def _entries(bench: Benchmark) -> list[str]:
    """What the output folder holds besides the environment records."""
    return sorted(p.name for p in bench.out.iterdir() if p.name != "runs")


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """Two strategies, two repeats each, with the real disk probe and environment record."""
    messages: list[str] = []
    bench = Benchmark(
        preset="tiny",
        out=tmp_path_factory.mktemp("bench") / "out",
        repeats=2,
        progress=False,
        warmup=False,
        checkpoint=tiny,
        log=messages.append,
    )
    returned = bench.run(TWO)
    return bench, returned, messages


def test_results_have_two_verified_rows_per_strategy(finished, tiny):
    bench, returned, _ = finished
    results = bench.results
    assert returned.equals(results)
    assert list(results.columns) == COLUMNS
    assert results["strategy"].tolist() == ["pytorch", "pytorch", "ts+chunks", "ts+chunks"]
    assert results["repeat"].tolist() == [0, 1, 0, 1]
    assert results["verified"].all()
    assert (results["tensors"] == 238).all()
    assert (results["params"] == tiny.params).all()
    assert (results["model_bytes"] == tiny.nbytes).all()
    assert (results["preset"] == "tiny").all()
    assert (results["run_id"] == bench.run_id).all()
    for column in ("save_s", "load_cold_s", "load_warm_s"):
        assert (results[column] > 0).all(), column
    assert (results["bytes"] >= tiny.nbytes).all()
    by_strategy = results.groupby("strategy")["files"].max()
    assert by_strategy["pytorch"] == 1
    assert by_strategy["ts+chunks"] > 1
    assert (results["disk_write_gbps"] == bench.limits.write_gbps).all()


def test_results_csv_holds_the_rows(finished):
    bench, _, _ = finished
    stored = bench.store.read()
    assert len(stored) == 4
    assert stored["run_id"].tolist() == [bench.run_id] * 4
    assert stored["strategy"].tolist() == bench.results["strategy"].tolist()
    assert stored["save_s"].tolist() == pytest.approx(bench.results["save_s"].tolist())


def test_environment_is_recorded(finished, tiny):
    bench, _, _ = finished
    environment = json.loads((bench.out / "runs" / f"{bench.run_id}.json").read_text())
    assert environment["run_id"] == bench.run_id
    assert environment["tensors"] == 238
    assert environment["model_bytes"] == tiny.nbytes
    limits = environment["limits"]
    assert limits["write_gbps"] > 0
    assert limits["read_gbps"] > 0
    assert limits["probe_bytes"] > 0
    assert 0 < limits["probe_s"] <= environment["prepare_s"]
    assert environment["packages"]["torch"] == torch.__version__
    assert environment["packages"]["tensorstore"]


def test_no_checkpoints_or_partials_remain(finished):
    bench, _, _ = finished
    assert _entries(bench) == ["results.csv"]
    assert (bench.out / "runs" / f"{bench.run_id}.json").is_file()


def test_summary_has_one_line_per_strategy(finished):
    bench, _, _ = finished
    summary = bench.summary()
    assert list(summary.index) == TWO
    assert (summary["repeats"] == 2).all()
    assert summary["verified"].all()


def test_keep_checkpoints_keeps_exactly_the_strategy_dirs(make_bench, tiny):
    bench = make_bench(repeats=2, keep_checkpoints=True)
    bench.run(TWO)
    assert _entries(bench) == sorted(["results.csv", *TWO])
    for name in TWO:
        verify(get_strategy(name).load(bench.out / name, _ignore), tiny.tensors, name)
    assert bench.results["verified"].all()


def test_a_kept_checkpoint_is_replaced_by_the_next_run(make_bench):
    make_bench(keep_checkpoints=True).run(["pytorch"])
    messages: list[str] = []
    bench = make_bench(log=messages.append)
    bench.run(["pytorch"])
    assert _entries(bench) == ["results.csv"]
    assert any("replacing the checkpoint" in m for m in messages)


def test_rerunning_a_phase_replaces_its_rows_but_appends_to_the_csv(make_bench):
    bench = make_bench(repeats=2)
    bench.run(TWO)
    first = bench.results
    again = bench.run_phase("pytorch")
    results = bench.results
    assert results["strategy"].tolist() == ["pytorch", "pytorch", "ts+chunks", "ts+chunks"]
    assert results[results["strategy"] == "pytorch"].reset_index(drop=True).equals(again)
    assert results[results["strategy"] == "ts+chunks"].equals(first[first["strategy"] == "ts+chunks"])
    stored = bench.store.read()
    assert len(stored) == 6
    assert stored["strategy"].tolist() == ["pytorch"] * 2 + ["ts+chunks"] * 2 + ["pytorch"] * 2


def test_results_follow_the_registry_order_whatever_the_run_order(make_bench):
    bench = make_bench()
    bench.run(["ts+chunks", "pytorch"])
    assert bench.results["strategy"].tolist() == ["pytorch", "ts+chunks"]
    assert bench.store.read()["strategy"].tolist() == ["ts+chunks", "pytorch"]


def test_warmup_leaves_nothing_behind(make_bench):
    bench = make_bench(warmup=True)
    bench.run(["pytorch"])
    assert _entries(bench) == ["results.csv"]
    assert bench.results["verified"].all()


def test_warmup_survives_a_leftover_from_a_killed_warmup(make_bench, tmp_path):
    leftover = tmp_path / "out" / ".warmup-pytorch"
    leftover.mkdir(parents=True)
    (leftover / "model.pt").write_bytes(b"from a killed run")
    bench = make_bench(warmup=True)
    bench.run(["pytorch"])
    assert bench.results["verified"].all()


def _corrupt_torch_loads(monkeypatch) -> None:
    real_load = TorchSave.load

    def corrupting_load(self, directory, progress):
        tensors = real_load(self, directory, progress)
        flipped = OrderedDict(tensors)
        name = "model.layers.0.self_attn.v_proj.weight"
        flipped[name] = tensors[name].clone()
        flipped[name].view(torch.int16)[0, 0] ^= 1
        return flipped

    monkeypatch.setattr(TorchSave, "load", corrupting_load)


def test_a_load_that_does_not_verify_is_recorded_then_raised(make_bench, monkeypatch):
    _corrupt_torch_loads(monkeypatch)
    messages: list[str] = []
    bench = make_bench(log=messages.append)
    with pytest.raises(VerificationError, match="pytorch"):
        bench.run_phase("pytorch")
    assert bench.store.read()["verified"].tolist() == [False]
    assert bench.results["verified"].tolist() == [False]
    assert any("VERIFICATION FAILED" in m and "v_proj" in m for m in messages)
    assert _entries(bench) == ["results.csv"]


def test_an_interrupted_phase_leaves_no_checkpoint_and_no_row(make_bench, monkeypatch):
    calls = []

    def interrupted_save(self, tensors, directory, progress):
        calls.append(directory)
        (directory / "model.pt").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(TorchSave, "save", interrupted_save)
    bench = make_bench()
    with pytest.raises(KeyboardInterrupt):
        bench.run_phase("pytorch")
    assert len(calls) == 1
    assert ".partial-" in calls[0].name
    assert _entries(bench) == []
    assert bench.results.empty


def test_bad_arguments(tmp_path):
    with pytest.raises(UnknownChoiceError, match="tiny"):
        Benchmark(preset="openllama-70b", out=tmp_path)
    with pytest.raises(ValueError, match="repeats"):
        Benchmark(preset="tiny", out=tmp_path, repeats=0)
    with pytest.raises(UnknownChoiceError, match="ts\\+chunks"):
        Benchmark(preset="tiny", out=tmp_path, progress=False).run_phase("nope")
    assert list(tmp_path.iterdir()) == []


def test_a_local_model_path_names_the_preset(tmp_path):
    bench = Benchmark(model_path=tmp_path / "my-llama", out=tmp_path / "out")
    assert bench.preset == "local:my-llama"
    with pytest.raises(ckptbench.ModelSourceError):
        bench.prepare()
    assert not (tmp_path / "out").exists()


def test_run_each_goes_on_past_a_phase_that_does_not_verify(make_bench, monkeypatch):
    _corrupt_torch_loads(monkeypatch)
    messages: list[str] = []
    bench = make_bench(log=messages.append)
    assert bench.run_each(["pytorch", "ts+chunks"]) == ["pytorch"]
    assert bench.results.groupby("strategy")["verified"].all().to_dict() == {"pytorch": False, "ts+chunks": True}
    assert any(m.startswith("error: pytorch") for m in messages)
