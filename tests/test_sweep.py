"""Knob sweeps: values from the options' own types, valid combinations only, knobs read back from ``config``."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest

from ckptbench import TensorStoreOptions, sweep
from ckptbench.cli import main
from ckptbench.errors import UnknownChoiceError, UsageError
from ckptbench.results import HEADER


def test_parse_knob_understands_sizes_choices_and_switches():
    assert sweep.parse_knob("chunk_bytes=64K,1M,default") == ("chunk_bytes", [65536, 1 << 20, None])
    assert sweep.parse_knob("concurrency=4,128") == ("concurrency", [4, 128])
    assert sweep.parse_knob("sync=on,off") == ("sync", [True, False])
    assert sweep.parse_knob("dtype=float32,float16") == ("dtype", ["float32", "float16"])
    assert sweep.parse_knob("compression=none,gzip,zstd") == ("compression", [None, "gzip", "zstd"])
    assert sweep.parse_knob("inflight_bytes=0,1G") == ("inflight_bytes", [0, 1 << 30])


def test_allowed_values_come_from_the_options_types():
    assert TensorStoreOptions.choices("dtype") == ("float32", "float16")
    assert TensorStoreOptions.choices("compression") == ("gzip", "zstd", None)
    assert TensorStoreOptions.choices("driver") == ("file", "ocdbt")
    assert TensorStoreOptions.choices("chunk_bytes") is None
    assert set(sweep.KNOBS) == set(TensorStoreOptions.__dataclass_fields__)
    for knob in sweep.KNOBS:  # every knob's default parses back from its formatted value
        default = getattr(TensorStoreOptions(), knob)
        assert sweep.parse_knob(f"{knob}={sweep.format_value(knob, default)}") == (knob, [default])


@pytest.mark.parametrize(
    "spec", ["chunk=1M", "chunk_bytes", "chunk_bytes=", "chunk_bytes=lots", "dtype=int8", "sync=maybe", "driver=s4"]
)
def test_parse_knob_rejects_bad_specs(spec):
    with pytest.raises(UsageError, match="--knob"):
        sweep.parse_knob(spec)


def test_grid_is_the_cross_product_of_valid_combinations():
    knobs = {"chunk_bytes": [1 << 20, 64 << 20], "driver": ["file", "ocdbt"], "format": ["zarr", "zarr3"]}
    strategies = sweep.grid(knobs)
    assert len(strategies) == 2 * 2 * 2 - 2
    assert all(s.options.is_valid() for s in strategies)
    assert not TensorStoreOptions(driver="ocdbt", format="zarr3").is_valid()
    assert strategies[0].name == "ts[chunk_bytes=1M,driver=file,format=zarr]"
    assert strategies[0].options == TensorStoreOptions(chunk_bytes=1 << 20)


def test_a_base_strategy_names_its_grid_and_keeps_its_other_knobs():
    base = sweep.base_strategy("ts+best")
    strategies = sweep.grid({"io_mode": ["default", "direct"]}, base)
    assert [s.name for s in strategies] == ["ts+best", "ts+best[io_mode=direct]"]
    assert strategies[0] is base  # the combination that changes nothing is the base itself
    assert strategies[1].options == replace(base.options, io_mode="direct")


def test_a_base_must_be_a_registered_tensorstore_strategy():
    with pytest.raises(UsageError, match="not a TensorStore strategy"):
        sweep.base_strategy("safetensors")
    with pytest.raises(UnknownChoiceError):
        sweep.base_strategy("ts+fastest")


def test_peers_are_measured_in_the_same_rounds_as_the_grid(make_bench):
    bench = make_bench(repeats=2, order="interleaved")
    summary, phases = sweep.run(bench, {"io_mode": ["default", "direct"]}, sweep.base_strategy("ts+best"), ["pytorch"])
    assert set(summary.index) == {"ts+best", "ts+best[io_mode=direct]", "pytorch"}
    assert all(p.ok for p in phases)
    assert summary["verified"].all()
    rounds = bench.results.groupby("repeat")["strategy"].apply(set)
    assert all(names == set(summary.index) for names in rounds)


def test_knob_columns_come_from_each_rows_config():
    rows = pd.DataFrame(
        {
            "strategy": ["any name", "another"],
            "config": [
                json.dumps({"library": "tensorstore", "chunk_bytes": 1 << 20, "sync": False}),
                json.dumps({"library": "tensorstore", "chunk_bytes": 64 << 20, "sync": True}),
            ],
        }
    )
    columns = sweep.knob_columns(rows, ["chunk_bytes", "sync"])
    assert columns["chunk_bytes"].tolist() == ["1M", "64M"]
    assert columns["sync"].tolist() == ["off", "on"]


@pytest.mark.slow
def test_sweep_command_runs_a_small_grid(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--preset", "tiny", "--knob", "chunk_bytes=64K,1M", "--knob", "dtype=float32,float16"]
    assert main([*argv, "--out", str(out), "--no-warmup", "--no-drift"]) == 0
    printed = capsys.readouterr().out
    rows = pd.read_csv(out / sweep.RESULTS_FILE)
    assert list(rows.columns) == HEADER
    expected = sweep.grid({"chunk_bytes": [1 << 16, 1 << 20], "dtype": ["float32", "float16"]})
    assert sorted(rows["strategy"]) == sorted(s.name for s in expected)
    for _, row in rows.iterrows():
        options = next(s.options for s in expected if s.name == row["strategy"])
        assert json.loads(row["config"])["chunk_bytes"] == options.chunk_bytes
    assert rows["verified"].all()
    assert "best (lowest median save + cold load): ts[" in printed
    assert (out / f"{sweep.FIGURE_STEM}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "results.csv").exists()  # sweeps keep their own store


def test_sweep_command_rejects_a_bad_knob(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--preset", "tiny", "--knob", "colour=red", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "NAME one of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
