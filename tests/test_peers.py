"""Beyond the eight: the peer strategies round-trip, their layouts, in-flight overlap and memory bounds."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import pytest
import torch

import ckptbench
from ckptbench import EIGHT_WAY, STRATEGIES, Benchmark, RunConfig, TensorStore, TensorStoreOptions, model
from ckptbench.bitwise import check_identical
from ckptbench.measure import measure

from conftest import FAKE_LIMITS, load_checkpoint, save_checkpoint

EXTRA = [name for name in STRATEGIES if name not in EIGHT_WAY]


def test_the_registry_keeps_the_eight_and_adds_the_peers():
    assert list(STRATEGIES)[: len(EIGHT_WAY)] == list(EIGHT_WAY)
    assert {"safetensors", "pytorch+mmap", "dcp", "ts+zarr3", "ts+zstd", "ts+nosync", "ts+best"} <= set(EXTRA)
    assert ckptbench.parse_strategies("every") == list(STRATEGIES)


@pytest.mark.parametrize("name", EXTRA)
def test_each_extra_strategy_round_trips_bit_exactly(name, tiny, saved):
    path, usage = saved[name].path, saved[name].usage
    loaded = load_checkpoint(STRATEGIES[name], path)
    assert len(loaded) == 238
    check_identical(loaded, tiny.tensors, name)
    assert usage.bytes <= STRATEGIES[name].estimate_bytes(tiny.tensors)


def test_zarr3_writes_one_shard_per_tensor(saved):
    usage = saved["ts+zarr3"].usage
    assert usage.files == 2 * 238 + 1  # zarr.json and one shard per tensor, plus the manifest


def test_nosync_changes_only_the_fsyncs(saved):
    nosync = STRATEGIES["ts+nosync"].options
    assert replace(nosync, sync=True) == TensorStoreOptions()
    baseline, unsynced = saved["tensorstore"].usage, saved["ts+nosync"].usage
    assert unsynced.files == baseline.files
    assert abs(unsynced.bytes - baseline.bytes) < 100  # the manifest records the option


def test_zstd_compresses_like_gzip_does(saved):
    assert saved["ts+zstd"].usage.bytes < saved["tensorstore"].usage.bytes


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
    save_checkpoint(strategy, tensors, tmp_path / name)
    with measure() as timing:
        loaded = load_checkpoint(strategy, tmp_path / name)
    assert timing.peak_rss >= 0.9 * nbytes
    check_identical(loaded, tensors, name)


@pytest.mark.parametrize("inflight", [0, 1 << 20, 1 << 30])
def test_inflight_overlap_keeps_order_and_bits(inflight, tiny, tmp_path):
    strategy = TensorStore("ts", TensorStoreOptions(chunk_bytes=1 << 20, inflight_bytes=inflight))
    progress: list[int] = []
    save_checkpoint(strategy, tiny.tensors, tmp_path / "ckpt", progress.append)
    assert sum(progress) == tiny.nbytes
    loaded = load_checkpoint(strategy, tmp_path / "ckpt")
    check_identical(loaded, tiny.tensors, f"inflight {inflight}")


@pytest.fixture(scope="module")
def mem_model() -> model.ModelCheckpoint:
    """~235 MB in float16 whose largest tensor is under 6 MB: a whole-model copy stands out from any one tensor."""
    return model.build(model.Preset("mem", 8000, 1024, 2816, 8, 8, "large enough to show a whole-model copy"))


INFLIGHT_32M = TensorStore("ts+best@32M", replace(ckptbench.STRATEGIES["ts+best"].options, inflight_bytes=32 << 20))


@pytest.mark.slow  # a 235 MB model, a phase each
@pytest.mark.parametrize("strategy", ["pytorch", "ts+chunks", "ts+float16", INFLIGHT_32M], ids=str)
def test_memory_stays_within_one_loaded_copy(strategy, mem_model, tmp_path):
    """A whole-model copy during a save (e.g. converting every tensor to float32 first) breaks the bound."""
    config = RunConfig(preset="tiny", out=tmp_path, progress=False, warmup=False, drift=False)
    bench = Benchmark(config, checkpoint=mem_model, limits=FAKE_LIMITS, log=lambda m: None)
    row = bench.run_phase(strategy).frame.iloc[0]
    assert row["peak_rss_save"] < 0.5 * mem_model.nbytes
    assert row["peak_rss_load"] < 1.0 * mem_model.nbytes + (64 << 20)


def test_checkpoint_format_mismatch_is_refused(saved):
    path = saved["ts+zarr3"].path
    with pytest.raises(ckptbench.CheckpointError, match="written as"):
        load_checkpoint(STRATEGIES["tensorstore"], path)
