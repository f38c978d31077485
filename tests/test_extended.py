"""Beyond the eight: the peer strategies, in-flight overlap, knob sweeps, targets and memory bounds."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

import ckptbench
from ckptbench import EIGHT_WAY, STRATEGIES, Benchmark, TensorStore, TensorStoreOptions, disk, model, sweep, targets
from ckptbench.cli import main
from ckptbench.errors import CkptbenchError
from ckptbench.limits import Limits
from ckptbench.measure import measure
from ckptbench.results import COLUMNS
from ckptbench.verify import verify

EXTRA = [name for name in STRATEGIES if name not in EIGHT_WAY]


def _save(strategy: ckptbench.Strategy, tensors, path: Path) -> disk.DiskUsage:
    with disk.staged(path) as partial:
        strategy.save(tensors, partial, lambda n: None)
    return disk.evict(path)


@pytest.fixture(scope="module")
def extra_saved(tiny, tmp_path_factory) -> dict[str, tuple[Path, disk.DiskUsage]]:
    root = tmp_path_factory.mktemp("extended")
    return {name: (root / name, _save(STRATEGIES[name], tiny.tensors, root / name)) for name in EXTRA}


def test_the_registry_keeps_the_eight_and_adds_the_peers():
    assert list(STRATEGIES)[: len(EIGHT_WAY)] == list(EIGHT_WAY)
    assert {"safetensors", "pytorch+mmap", "dcp", "ts+zarr3", "ts+zstd", "ts+nosync", "ts+best"} <= set(EXTRA)
    assert ckptbench.strategies.parse_strategies("every") == list(STRATEGIES)


@pytest.mark.parametrize("name", EXTRA)
def test_each_extra_strategy_round_trips_bit_exactly(name, tiny, extra_saved):
    path, usage = extra_saved[name]
    loaded = STRATEGIES[name].load(path, lambda n: None)
    assert len(loaded) == 238
    verify(loaded, tiny.tensors, name)
    assert usage.bytes <= STRATEGIES[name].estimate_bytes(tiny.tensors)


def test_zarr3_writes_one_shard_per_tensor(extra_saved):
    _, usage = extra_saved["ts+zarr3"]
    assert usage.files == 2 * 238 + 1  # zarr.json and one shard per tensor, plus the manifest


def test_nosync_changes_only_the_fsyncs(tiny, tmp_path):
    nosync = STRATEGIES["ts+nosync"].options
    assert replace(nosync, sync=True) == TensorStoreOptions()
    baseline = _save(STRATEGIES["tensorstore"], tiny.tensors, tmp_path / "baseline")
    unsynced = _save(STRATEGIES["ts+nosync"], tiny.tensors, tmp_path / "nosync")
    assert unsynced.files == baseline.files
    assert abs(unsynced.bytes - baseline.bytes) < 100  # the manifest records the option


def test_zstd_compresses_like_gzip_does(extra_saved, tiny, tmp_path):
    raw = _save(STRATEGIES["tensorstore"], tiny.tensors, tmp_path / "raw")
    assert extra_saved["ts+zstd"][1].bytes < raw.bytes


def _big(megabytes: int) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    per = megabytes * 2**20 // 8
    return OrderedDict((f"t{i}", torch.randn(per // 2, generator=generator, dtype=torch.float32)) for i in range(8))


@pytest.mark.parametrize("name", ["safetensors", "pytorch+mmap"])
def test_lazy_formats_are_materialised_inside_the_load(name, tmp_path):
    """A load that returned mmap-backed tensors would not have read the file: its memory would not grow."""
    tensors = _big(160)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    strategy = STRATEGIES[name]
    _save(strategy, tensors, tmp_path / name)
    with measure() as timing:
        loaded = strategy.load(tmp_path / name, lambda n: None)
    assert timing.peak_rss >= 0.9 * nbytes
    verify(loaded, tensors, name)


@pytest.mark.parametrize("inflight", [0, 1 << 20, 1 << 30])
def test_inflight_overlap_keeps_order_and_bits(inflight, tiny, tmp_path):
    strategy = TensorStore("ts", TensorStoreOptions(chunk_bytes=1 << 20, inflight_bytes=inflight))
    progress: list[int] = []
    with disk.staged(tmp_path / "ckpt") as partial:
        strategy.save(tiny.tensors, partial, progress.append)
    assert sum(progress) == tiny.nbytes
    loaded = strategy.load(tmp_path / "ckpt", lambda n: None)
    verify(loaded, tiny.tensors, f"inflight {inflight}")


@pytest.fixture(scope="module")
def mem_model() -> model.ModelCheckpoint:
    """~235 MB in float16 whose largest tensor is under 6 MB: a whole-model copy stands out from any one tensor."""
    return model.build(model.Preset("mem", 8000, 1024, 2816, 8, 8, "large enough to show a whole-model copy"))


INFLIGHT_32M = TensorStore("ts+best@32M", replace(ckptbench.strategies.BEST, inflight_bytes=32 << 20))


@pytest.mark.parametrize("strategy", ["pytorch", "ts+chunks", "ts+float16", INFLIGHT_32M], ids=str)
def test_memory_stays_within_one_loaded_copy(strategy, mem_model, tmp_path):
    """A whole-model copy during a save (e.g. converting every tensor to float32 first) breaks the bound."""
    bench = Benchmark(
        preset="mem",
        checkpoint=mem_model,
        out=tmp_path,
        progress=False,
        warmup=False,
        limits=Limits(1.0, 1.0, 0),
        log=lambda m: None,
    )
    row = bench.run_phase(strategy).iloc[0]
    assert row["peak_rss_save"] < 0.5 * mem_model.nbytes
    assert row["peak_rss_load"] < 1.0 * mem_model.nbytes + (64 << 20)


def test_parse_knob_understands_sizes_choices_and_switches():
    assert sweep.parse_knob("chunk_bytes=64K,1M,default") == ("chunk_bytes", [65536, 1 << 20, None])
    assert sweep.parse_knob("concurrency=4,128") == ("concurrency", [4, 128])
    assert sweep.parse_knob("sync=on,off") == ("sync", [True, False])
    assert sweep.parse_knob("dtype=float32,float16") == ("dtype", ["float32", "float16"])
    assert sweep.parse_knob("compression=none,gzip,zstd") == ("compression", [None, "gzip", "zstd"])


@pytest.mark.parametrize(
    "spec", ["chunk=1M", "chunk_bytes", "chunk_bytes=", "chunk_bytes=lots", "dtype=int8", "sync=maybe"]
)
def test_parse_knob_rejects_bad_specs(spec):
    with pytest.raises(CkptbenchError, match="--knob"):
        sweep.parse_knob(spec)


def test_grid_is_the_cross_product_minus_what_makes_no_sense():
    knobs = {"chunk_bytes": [1 << 20, 64 << 20], "driver": ["file", "ocdbt"], "format": ["zarr", "zarr3"]}
    strategies = sweep.grid(knobs)
    assert len(strategies) == 2 * 2 * 2 - 2  # ocdbt + zarr3 is skipped for both chunk sizes
    assert all(not (s.options.driver == "ocdbt" and s.options.format == "zarr3") for s in strategies)
    assert strategies[0].name == "ts[chunk_bytes=1M,driver=file,format=zarr]"
    assert strategies[0].options == TensorStoreOptions(chunk_bytes=1 << 20)


def test_sweep_rows_name_their_knobs():
    rows = pd.DataFrame({"strategy": ["ts[chunk_bytes=1M,sync=off]", "ts[chunk_bytes=64M,sync=on]"]})
    columns = sweep.knob_columns(rows)
    assert columns["chunk_bytes"].tolist() == ["1M", "64M"]
    assert columns["sync"].tolist() == ["off", "on"]


def test_sweep_command_runs_a_small_grid(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            "--preset",
            "tiny",
            "--knob",
            "chunk_bytes=64K,1M",
            "--knob",
            "dtype=float32,float16",
            "--out",
            str(out),
            "--no-warmup",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    rows = pd.read_csv(out / sweep.RESULTS_FILE)
    assert list(rows.columns) == COLUMNS
    assert sorted(rows["strategy"]) == sorted(
        s.name for s in sweep.grid({"chunk_bytes": [1 << 16, 1 << 20], "dtype": ["float32", "float16"]})
    )
    assert rows["verified"].all()
    assert "best (lowest median save + cold load): ts[" in printed
    assert (out / f"{sweep.FIGURE_STEM}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "results.csv").exists()  # sweeps keep their own store


def test_sweep_command_rejects_a_bad_knob(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--preset", "tiny", "--knob", "colour=red", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "o").exists()


def _results(**save_s: float) -> pd.DataFrame:
    rows = []
    for name, seconds in save_s.items():
        rows.append(
            {column: 0 for column in COLUMNS}
            | {
                "strategy": name,
                "save_s": seconds,
                "load_cold_s": seconds,
                "load_warm_s": seconds / 2,
                "bytes": 10**9,
                "model_bytes": 10**9,
                "verified": True,
                "disk_write_gbps": 1.0,
                "disk_read_gbps": 1.0,
                "overhead_s": 0.1,
                "cpu_load_cold_s": seconds,
                "tensors": 238,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def test_targets_compare_ts_best_with_its_peers_and_the_disk():
    results = _results(pytorch=2.0, safetensors=1.0, **{"ts+best": 1.25})
    timed = results[["save_s", "load_cold_s", "load_warm_s"]].to_numpy().sum()
    start = Limits(write_gbps=1.0, read_gbps=1.0, probe_bytes=1, probe_s=1.0)
    table = targets.ratios(results, wall_s=(timed + 1.0) / 0.9, prepare_s=3.0, start_limits=start)
    by_metric = table.set_index("metric")
    assert by_metric.loc["ts+best save / pytorch save", "measured"] == pytest.approx(0.625)
    assert by_metric.loc["ts+best save / pytorch save", "met"] == "yes"
    assert by_metric.loc["ts+best cold load / safetensors cold load", "met"] == "NO"
    share = by_metric.loc["ts+best: bytes written / s as a share of the disk's durable write"]
    assert share["measured"] == pytest.approx(0.8)
    assert share["met"] == "yes"
    assert by_metric.loc["pytorch: bytes written / s as a share of the disk's durable write", "met"] == ""
    overhead = "wall time outside timed regions (the strategies' and the disk probes') / run wall time"
    assert by_metric.loc[overhead, "measured"] == pytest.approx(0.1)
    assert by_metric.loc[overhead, "met"] == "yes"
    with_probes = by_metric.loc["  the same, counting the disk probes' I/O as overhead too", "measured"]
    assert with_probes == pytest.approx(0.1 + 1.0 / ((timed + 1.0) / 0.9), abs=1e-3)
    wall = (timed + 1.0) / 0.9
    set_up = by_metric.loc["  of which set-up (model build, cleanup) / run wall time", "measured"]
    assert set_up == pytest.approx(2.0 / wall, abs=1e-3)
    warm = by_metric.loc[
        "ts+best: bytes read / s warm (no disk, the load's own work) as a share of the disk's cold read", "measured"
    ]
    assert warm == pytest.approx(1.6)
    cores = psutil.cpu_count()
    busy = by_metric.loc[f"ts+best: CPU time during the cold load / (its wall time x {cores} cores)", "measured"]
    assert busy == pytest.approx(1 / cores, abs=1e-3)
    assert by_metric.loc["harness cost inside a timed region / shortest timed region", "met"] == "yes"


def test_targets_show_whether_the_disk_held_still():
    results = _results(pytorch=2.0, safetensors=1.0, **{"ts+best": 1.25})
    table = targets.ratios(results, wall_s=100.0, end_limits=Limits(write_gbps=0.5, read_gbps=1.0, probe_bytes=1))
    by_metric = table.set_index("metric")["measured"]
    assert by_metric["disk's durable write probed after the strategies / before them (1: steady)"] == 0.5
    assert by_metric["disk's cold read probed after the strategies / before them (1: steady)"] == 1.0
    assert not any("probed after" in metric for metric in targets.ratios(results, wall_s=100.0)["metric"])


def test_bench_command_prints_the_ratios(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--out", str(tmp_path), "--no-warmup"]) == 0
    printed = capsys.readouterr().out
    assert "ts+best save / pytorch save" in printed
    assert "ts+best cold load / safetensors cold load" in printed
    assert "wall time outside timed regions" in printed
    assert "warm (no disk" in printed
    assert "probed after the strategies / before them" in printed
    assert set(pd.read_csv(tmp_path / "bench.csv")["strategy"]) == {"pytorch", "safetensors", "ts+best"}
    (environment,) = (tmp_path / "runs").glob("*.json")
    recorded = json.loads(environment.read_text())
    assert recorded["limits_end"]["read_gbps"] > 0
    assert recorded["wall_s"] > recorded["prepare_s"]


def test_overhead_is_recorded_per_repeat(make_bench):
    rows = make_bench(repeats=2).run_phase("ts+chunks")
    assert (rows["overhead_s"] > 0).all()


def test_run_exports_an_extended_figure_when_peers_ran(tmp_path):
    assert (
        main(
            [
                "run",
                "--preset",
                "tiny",
                "--strategies",
                "tensorstore,safetensors",
                "--out",
                str(tmp_path),
                "--no-warmup",
            ]
        )
        == 0
    )
    assert (tmp_path / "8way_performance_comparison.png").is_file()
    assert (tmp_path / f"{ckptbench.report.EXTENDED_STEM}.png").is_file()


def test_checkpoint_format_mismatch_is_refused(extra_saved):
    path, _ = extra_saved["ts+zarr3"]
    with pytest.raises(ckptbench.CheckpointError, match="written as"):
        STRATEGIES["tensorstore"].load(path, lambda n: None)
