"""The harness end to end on the tiny model: rows, order, failures kept as rows, kept checkpoints, re-runs."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ckptbench
from ckptbench import Benchmark, RunConfig, TorchSave, UnknownChoiceError, UsageError, cycle, get_strategy
from ckptbench import limits as limits_lib
from ckptbench.bitwise import check_identical
from ckptbench.results import COLUMNS, SCHEMA_VERSION

from conftest import leftovers, load_checkpoint

TWO = ["pytorch", "ts+chunks"]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """Two strategies, two interleaved repeats each, with the real disk probe, drift probes and environment."""
    messages: list[str] = []
    config = RunConfig(
        preset="tiny", out=tmp_path_factory.mktemp("bench") / "out", repeats=2, progress=False, warmup=False
    )
    bench = Benchmark(config, checkpoint=tiny, log=messages.append)
    phases = bench.run(TWO)
    return bench, phases, messages


def test_results_have_two_verified_rows_per_strategy_in_interleaved_order(finished, tiny):
    bench, phases, _ = finished
    assert [p.strategy for p in phases] == TWO
    assert all(p.ok for p in phases)
    assert [len(p.rows) for p in phases] == [2, 2]
    stored = bench.results_file.read()
    assert stored["strategy"].tolist() == ["pytorch", "ts+chunks", "pytorch", "ts+chunks"]  # round-robin
    assert stored["repeat"].tolist() == [0, 0, 1, 1]
    results = bench.results
    assert list(results.columns) == COLUMNS
    assert results["strategy"].tolist() == ["pytorch", "pytorch", "ts+chunks", "ts+chunks"]
    assert results["verified"].all()
    assert (results["error"] == "").all()
    assert (results["schema_version"] == SCHEMA_VERSION).all()
    assert (results["tensors"] == 238).all()
    assert (results["params"] == tiny.params).all()
    assert (results["model_bytes"] == tiny.nbytes).all()
    assert (results["run_id"] == bench.run_id).all()
    for column in ("save_s", "save_blocking_s", "load_cold_s", "load_warm_s"):
        assert (results[column] > 0).all(), column
    assert (results["save_blocking_s"] == results["save_s"]).all()  # synchronous saves
    assert (results["bytes"] >= tiny.nbytes).all()
    by_strategy = results.groupby("strategy")["files"].max()
    assert by_strategy["pytorch"] == 2  # model.pt and the manifest
    assert by_strategy["ts+chunks"] > 2
    assert (results["disk_write_gbps"] == bench.limits.write_gbps).all()
    assert (results["disk_files_per_s"] == bench.limits.files_per_s).all()
    assert (results["fresh_copy_gbps"] == bench.limits.fresh_copy_gbps).all()
    assert (results["drift_write_gbps"] > 0).all()
    assert (results["drift_read_gbps"] > 0).all()
    for part in ("evict_s", "verify_s", "cleanup_s"):  # where the untimed time goes
        assert (results[part] > 0).all(), part
    parts = results[["warmup_s", "evict_s", "verify_s", "cleanup_s"]].sum(axis=1)
    assert (parts <= results["overhead_s"]).all()


def test_every_row_carries_its_configuration(finished):
    bench, _, _ = finished
    stored = bench.results_file.read()
    for _, row in stored.iterrows():
        assert json.loads(row["config"]) == get_strategy(row["strategy"]).config()
    chunks = json.loads(stored.loc[stored["strategy"] == "ts+chunks", "config"].iloc[0])
    assert chunks["library"] == "tensorstore"
    assert chunks["chunk_bytes"] == 1 << 20


def test_environment_is_recorded(finished, tiny):
    bench, _, _ = finished
    environment = json.loads((bench.out / "runs" / f"{bench.run_id}.json").read_text())
    assert environment["run_id"] == bench.run_id
    assert environment["tensors"] == 238
    assert environment["model_bytes"] == tiny.nbytes
    assert environment["order"] == "interleaved"
    assert environment["settings"]["repeats"] == 2
    limits = environment["limits"]
    assert limits["write_gbps"] > 0
    assert limits["read_gbps"] > 0
    assert 0 < limits["probe_s"] <= environment["prepare_s"]
    assert limits["tool"] in {"builtin", limits_lib.probes.backend().tool}
    assert limits["write_gbps"] == max(limits["write_by_streams"].values())
    assert set(limits["parameters"]["how"]) >= {"write/64", "read/64", "files/16", "copy/2"}
    assert environment["packages"]["torch"] == torch.__version__


def test_no_checkpoints_or_partials_remain(finished):
    bench, _, _ = finished
    assert leftovers(bench.out) == ["results.csv"]


def test_summary_has_one_line_per_strategy(finished):
    bench, _, _ = finished
    summary = bench.summary()
    assert list(summary.index) == TWO
    assert (summary["repeats"] == 2).all()
    assert summary["verified"].all()


def test_shuffled_order_is_seeded_and_sequential_keeps_phases_together(make_bench):
    names = ["pytorch", "safetensors", "pytorch+mmap"]  # single-file formats: the quickest phases
    orders = []
    for _ in range(2):
        bench = make_bench(repeats=3, order="shuffled", seed=7)
        bench.run(names)
        orders.append(bench.results_file.read()["strategy"].tolist()[-9:])
    assert orders[0] == orders[1]
    assert [sorted(orders[0][i : i + 3]) for i in (0, 3, 6)] == [sorted(names)] * 3
    bench = make_bench(repeats=2, order="sequential")
    bench.run(names)
    assert bench.results_file.read()["strategy"].tolist()[-6:] == [n for n in names for _ in range(2)]


def test_keep_checkpoints_keeps_exactly_the_strategy_dirs(make_bench, tiny):
    bench = make_bench(repeats=2, keep_checkpoints=True)
    bench.run(TWO)
    assert leftovers(bench.out) == sorted(["results.csv", *TWO])
    for name in TWO:
        check_identical(load_checkpoint(get_strategy(name), bench.out / name), tiny.tensors, name)
    assert bench.results["verified"].all()


def test_a_kept_checkpoint_is_replaced_by_the_next_kept_one_and_left_alone_otherwise(make_bench, tiny):
    make_bench(keep_checkpoints=True).run(["pytorch"])
    first = (bench_out := make_bench().out / "pytorch" / "ckptbench.json").read_text()
    make_bench().run(["pytorch"])
    assert (bench_out).read_text() == first  # a run that keeps nothing does not touch it
    make_bench(keep_checkpoints=True, seed=1).run(["pytorch"])
    assert leftovers(make_bench().out) == ["pytorch", "results.csv"]
    check_identical(load_checkpoint(get_strategy("pytorch"), make_bench().out / "pytorch"), tiny.tensors, "kept")


def test_rerunning_a_phase_replaces_its_rows_but_appends_to_the_csv(make_bench):
    bench = make_bench(repeats=2)
    bench.run(TWO)
    first = bench.results
    again = bench.run_phase("pytorch")
    results = bench.results
    assert results["strategy"].tolist() == ["pytorch", "pytorch", "ts+chunks", "ts+chunks"]
    assert results[results["strategy"] == "pytorch"].reset_index(drop=True).equals(again.frame)
    assert results[results["strategy"] == "ts+chunks"].equals(first[first["strategy"] == "ts+chunks"])
    stored = bench.results_file.read()
    assert len(stored) == 6
    assert stored["strategy"].tolist()[-2:] == ["pytorch"] * 2


def test_results_follow_the_study_order_whatever_the_run_order(make_bench):
    bench = make_bench()
    bench.run(["ts+chunks", "pytorch"])
    assert bench.results["strategy"].tolist() == ["pytorch", "ts+chunks"]
    assert bench.results_file.read()["strategy"].tolist() == ["ts+chunks", "pytorch"]


def test_warmup_leaves_nothing_behind(make_bench):
    bench = make_bench(warmup=True)
    bench.run(["pytorch"])
    assert leftovers(bench.out) == ["results.csv"]
    assert bench.results["verified"].all()


def _corrupt_torch_loads(monkeypatch) -> None:
    real_load = TorchSave.load

    def corrupting_load(self, directory, entries, progress):
        tensors = real_load(self, directory, entries, progress)
        flipped = OrderedDict(tensors)
        name = "model.layers.0.self_attn.v_proj.weight"
        flipped[name] = tensors[name].clone()
        flipped[name].view(torch.int16)[0, 0] ^= 1
        return flipped

    monkeypatch.setattr(TorchSave, "load", corrupting_load)


def test_a_load_that_does_not_verify_is_recorded_and_reported(make_bench, monkeypatch):
    _corrupt_torch_loads(monkeypatch)
    messages: list[str] = []
    bench = make_bench(log=messages.append)
    phase = bench.run_phase("pytorch")
    assert not phase.ok
    assert "did not match" in phase.error
    assert bench.results_file.read()["verified"].tolist() == [False]
    assert any("VERIFICATION FAILED" in m and "v_proj" in m for m in messages)
    assert leftovers(bench.out) == ["results.csv"]


def test_a_failing_strategy_is_a_row_and_the_run_goes_on(make_bench, monkeypatch):
    def broken_save(self, tensors, directory, progress):
        raise RuntimeError("the library broke")

    monkeypatch.setattr(TorchSave, "save", broken_save)
    bench = make_bench(repeats=2)
    phases = bench.run(["pytorch", "ts+chunks"])
    assert [p.ok for p in phases] == [False, True]
    assert "the library broke" in phases[0].error
    stored = bench.results_file.read()
    failed = stored[stored["strategy"] == "pytorch"]
    assert len(failed) == 1  # a failed strategy stops taking part
    assert "CheckpointError" in failed["error"].iloc[0]
    assert "the library broke" in failed["error"].iloc[0]
    assert failed["save_s"].isna().all()
    assert not failed["verified"].any()
    assert (stored[stored["strategy"] == "ts+chunks"]["error"] == "").all()
    summary = bench.summary()
    assert summary.loc["pytorch", "repeats"] == 0
    assert not summary.loc["pytorch", "verified"]
    assert "the library broke" in summary.loc["pytorch", "error"]
    assert leftovers(bench.out) == ["results.csv"]


def test_an_interrupted_phase_leaves_no_checkpoint_and_no_row(make_bench, monkeypatch):
    calls = []

    def interrupted_save(self, tensors, directory, progress):
        calls.append(directory.folder)
        (directory.folder / "model.pt").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(TorchSave, "save", interrupted_save)
    bench = make_bench()
    with pytest.raises(KeyboardInterrupt):
        bench.run_phase("pytorch")
    assert len(calls) == 1
    assert ".partial-" in calls[0].name
    assert leftovers(bench.out) == []
    assert bench.results_file.read().empty


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UnknownChoiceError, match="tiny"):
        RunConfig(preset="openllama-70b", out=tmp_path)
    with pytest.raises(UsageError, match="repeats"):
        RunConfig(preset="tiny", out=tmp_path, repeats=0)
    with pytest.raises(UsageError, match="seed"):
        RunConfig(preset="tiny", out=tmp_path, seed=-5)
    with pytest.raises(UsageError, match="order"):
        RunConfig(preset="tiny", out=tmp_path, order="random")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        RunConfig(preset="tiny", out=tmp_path / "a-file")
    with pytest.raises(UnknownChoiceError, match="ts\\+chunks"):
        Benchmark(RunConfig(preset="tiny", out=tmp_path / "out", progress=False)).run_phase("nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_run_config_stays_as_validated_and_every_changed_copy_is_validated_again():
    """Frozen so that the settings a run checked when it was made are the ones it runs and records."""
    config = RunConfig(preset="tiny", out="out")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.repeats = 0  # type: ignore[misc]
    with pytest.raises(UsageError, match="repeats must be at least 1, got 0"):
        dataclasses.replace(config, repeats=0)
    with pytest.raises(UsageError, match="load_ranks needs ranks"):
        dataclasses.replace(config, load_ranks=2)
    changed = dataclasses.replace(config, repeats=3, out="elsewhere")
    assert (changed.repeats, changed.out) == (3, Path("elsewhere"))  # normalised like the original
    assert (config.repeats, config.out) == (1, Path("out"))


def test_a_local_model_path_names_the_preset(tmp_path):
    bench = Benchmark(RunConfig(model_path=tmp_path / "my-llama", out=tmp_path / "out"))
    assert bench.preset == "local:my-llama"
    with pytest.raises(ckptbench.ModelSourceError):
        bench.prepare()
    assert not (tmp_path / "out").exists()


def test_a_load_that_would_not_fit_in_memory_is_refused_as_a_failed_row(make_bench, tiny, monkeypatch):
    bench = make_bench(warmup=False)
    memory = SimpleNamespace(available=tiny.nbytes - 1, total=2**34)
    monkeypatch.setattr(cycle.psutil, "virtual_memory", lambda: memory)
    phase = bench.run_phase("pytorch")
    assert not phase.ok
    assert phase.error.startswith("InsufficientMemoryError: not enough memory: pytorch [1/1] cold load needs about")
    assert f" GB (the model {tiny.nbytes / 1e9:.2f} GB), the rest of the machine " in phase.error  # who holds it
    (row,) = bench.results_file.read().itertuples()
    assert row.strategy == "pytorch"
    assert row.error == phase.error
    memory.available = tiny.nbytes
    assert bench.run_phase("pytorch").ok


def test_a_strategy_whose_load_holds_more_copies_is_refused_sooner(make_bench, tiny, monkeypatch):
    """The check asks each strategy how many copies its load holds: Orbax's two do not fit where one does."""
    assert get_strategy("orbax").load_copies() > get_strategy("ts+best").load_copies()
    bench = make_bench(warmup=False)
    memory = SimpleNamespace(available=int(tiny.nbytes * 1.5), total=2**34)
    monkeypatch.setattr(cycle.psutil, "virtual_memory", lambda: memory)
    assert bench.run_phase("pytorch").ok
    monkeypatch.setattr(TorchSave, "load_copies", lambda self: get_strategy("orbax").load_copies())
    phase = bench.run_phase("pytorch")
    assert not phase.ok
    assert phase.error.startswith("InsufficientMemoryError: not enough memory")
