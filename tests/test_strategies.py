"""The eight strategies: exact round trips, on-disk layout and sizes, the chunk rules, the space estimate."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

import ckptbench
from ckptbench import BASELINE, EIGHT_WAY, STRATEGIES, TensorStore, TensorStoreOptions, TorchSave, UnknownChoiceError
from ckptbench.bitwise import check_identical
from ckptbench.model import ROTARY_BUFFER
from ckptbench.strategies import BEST, MiB, divisor_chunks, from_config, get_strategy
from ckptbench.strategies.zarr import one_buffer
from ckptbench.study import GROUPS, parse_strategies

from conftest import load_checkpoint, save_checkpoint


def _ignore(nbytes: int) -> None:
    pass


def test_the_eight_way_set_is_registered_in_the_study_order():
    assert len(EIGHT_WAY) == 8
    assert len(set(EIGHT_WAY)) == 8
    assert set(EIGHT_WAY) <= set(STRATEGIES)
    assert EIGHT_WAY[0] == "pytorch"
    assert BASELINE in EIGHT_WAY
    for name in EIGHT_WAY:
        assert get_strategy(name).name == name
    assert isinstance(get_strategy("pytorch"), TorchSave)
    assert all(isinstance(get_strategy(name), TensorStore) for name in EIGHT_WAY if name != "pytorch")


def test_each_ablation_differs_from_the_baseline_in_the_field_it_names():
    baseline = get_strategy(BASELINE).options
    assert baseline == TensorStoreOptions()
    changed = {
        name: {k for k, v in vars(get_strategy(name).options).items() if v != getattr(baseline, k)}
        for name in EIGHT_WAY
        if name.startswith("ts+")
    }
    assert changed == {
        "ts+concurrency": {"concurrency"},
        "ts+chunks": {"chunk_bytes"},
        "ts+compression": {"compression"},
        "ts+float16": {"dtype"},
        "ts+ocdbt": {"driver"},
    }


@pytest.mark.parametrize("name", EIGHT_WAY)
def test_round_trip_is_bit_exact(name, tiny, saved):
    strategy = get_strategy(name)
    assert saved[name].progress_bytes == tiny.nbytes
    read: list[int] = []
    loaded = load_checkpoint(strategy, saved[name].path, read.append)
    assert sum(read) == tiny.nbytes
    check_identical(loaded, tiny.tensors, name)
    assert len(loaded) == 238
    assert list(loaded) == list(tiny.tensors)
    for tensor_name, want in tiny.tensors.items():
        got = loaded[tensor_name]
        assert got.dtype == want.dtype, tensor_name
        assert got.shape == want.shape, tensor_name
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), tensor_name
    assert loaded[ROTARY_BUFFER].dtype == torch.float32


def _zarray(saved, name: str, tensor: str) -> dict:
    return json.loads((saved[name].path / tensor / ".zarray").read_text())


def test_on_disk_dtypes_float32_baseline_and_float16_keeps_inv_freq_float32(tiny, saved):
    for tensor in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", ROTARY_BUFFER):
        assert _zarray(saved, BASELINE, tensor)["dtype"] == "<f4"
    assert _zarray(saved, "ts+float16", "model.embed_tokens.weight")["dtype"] == "<f2"
    assert _zarray(saved, "ts+float16", ROTARY_BUFFER)["dtype"] == "<f4"
    assert _zarray(saved, "ts+compression", "lm_head.weight")["compressor"]["id"] == "gzip"
    assert _zarray(saved, BASELINE, "lm_head.weight")["compressor"] is None


@pytest.mark.parametrize("name", [n for n in EIGHT_WAY if n not in ("pytorch", "ts+ocdbt")])
def test_on_disk_chunks_follow_the_strategys_rule(name, tiny, saved):
    options = get_strategy(name).options
    for tensor_name, tensor in tiny.tensors.items():
        meta = _zarray(saved, name, tensor_name)
        itemsize = options.disk_dtype(tensor.dtype).itemsize
        if options.chunk_bytes is None:
            assert meta["chunks"] == [min(64, d) for d in tensor.shape], tensor_name
        else:
            assert meta["chunks"] == divisor_chunks(tuple(tensor.shape), options.chunk_bytes // itemsize), tensor_name


def _expected_files(name: str, tiny) -> int:
    """zarr v2 on plain files: one file per chunk, one .zarray per tensor, plus the manifest."""
    options = get_strategy(name).options
    chunks = 0
    for tensor in tiny.tensors.values():
        shape = tuple(tensor.shape)
        chunk = options.chunk_shape(shape, options.disk_dtype(tensor.dtype).itemsize)
        chunks += math.prod(math.ceil(d / c) for d, c in zip(shape, chunk, strict=True))
    return chunks + len(tiny.tensors) + 1


@pytest.mark.parametrize("name", [n for n in EIGHT_WAY if n not in ("pytorch", "ts+ocdbt")])
def test_file_count_is_one_per_chunk(name, tiny, saved):
    assert saved[name].usage.files == _expected_files(name, tiny)


def test_pytorch_is_one_file_about_the_model_size_beside_the_manifest(tiny, saved):
    usage = saved["pytorch"].usage
    assert usage.files == 2
    assert tiny.nbytes <= usage.bytes < tiny.nbytes * 1.05


def test_float16_is_about_half_of_the_baseline(saved):
    ratio = saved["ts+float16"].usage.bytes / saved[BASELINE].usage.bytes
    assert 0.4 < ratio < 0.6


def test_gzip_is_smaller_than_the_baseline(saved):
    assert saved["ts+compression"].usage.bytes < saved[BASELINE].usage.bytes
    assert saved["ts+compression"].usage.bytes_allocated < saved[BASELINE].usage.bytes_allocated
    assert saved["ts+compression"].usage.files == saved[BASELINE].usage.files


def test_ocdbt_packs_chunks_into_far_fewer_files(saved):
    assert saved["ts+ocdbt"].usage.files < saved[BASELINE].usage.files / 2


def test_t5x_writes_fewer_files_than_the_baseline(saved):
    assert saved["t5x"].usage.files < saved[BASELINE].usage.files
    assert saved["t5x"].usage.bytes < saved[BASELINE].usage.bytes  # gzip


def test_concurrency_changes_no_bytes_on_disk(saved):
    assert saved["ts+concurrency"].usage.files == saved[BASELINE].usage.files
    # the manifest records the options, so only its few bytes may differ
    assert abs(saved["ts+concurrency"].usage.bytes - saved[BASELINE].usage.bytes) < 100


@pytest.mark.parametrize("name", EIGHT_WAY)
def test_estimate_bytes_is_an_upper_bound(name, tiny, saved):
    estimate = get_strategy(name).estimate_bytes(tiny.tensors)
    usage = saved[name].usage
    assert usage.bytes_allocated <= estimate
    assert usage.bytes <= estimate


SHAPES = [
    (1,),
    (7,),
    (97,),
    (136,),
    (2000, 136),
    (136, 136),
    (360, 136),
    (136, 360),
    (97, 89),
    (3200, 8640),
    (32000, 3200),
    (2, 3, 5, 7),
    (64, 1, 128),
    (),
]
TARGETS = [1, 2, 64, 1000, 4096, 1 << 18, (64 * MiB) // 4, 1 << 40]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_divisor_chunks_divide_the_shape_and_fit_the_target(shape):
    for target in TARGETS:
        chunks = divisor_chunks(shape, target)
        assert len(chunks) == len(shape)
        assert all(1 <= c <= d and d % c == 0 for c, d in zip(chunks, shape, strict=True)), (shape, target, chunks)
        assert math.prod(chunks) <= target, (shape, target, chunks)
        if math.prod(shape) <= target:
            assert chunks == list(shape), (shape, target, chunks)


def test_divisor_chunks_grow_with_the_target():
    shape = (3200, 8640)
    sizes = [math.prod(divisor_chunks(shape, target)) for target in TARGETS]
    assert sizes == sorted(sizes)
    assert divisor_chunks((97,), 10) == [1]  # a prime larger than the target can only be split into ones
    assert divisor_chunks((97,), 97) == [97]


def test_baseline_chunks_are_64_per_dimension():
    options = TensorStoreOptions()
    for shape in SHAPES:
        for itemsize in (2, 4):
            assert options.chunk_shape(shape, itemsize) == [min(64, d) for d in shape]


def test_chunk_bytes_option_uses_the_divisor_rule_per_itemsize():
    options = TensorStoreOptions(chunk_bytes=1 * MiB)
    for shape in SHAPES:
        for itemsize in (2, 4):
            assert options.chunk_shape(shape, itemsize) == divisor_chunks(shape, MiB // itemsize)


def test_float16_option_narrows_only_what_it_holds_exactly():
    options = TensorStoreOptions(dtype="float16")
    assert options.disk_dtype(torch.float16) == torch.float16
    assert options.disk_dtype(torch.float32) == torch.float32
    assert options.disk_dtype(torch.bfloat16) == torch.bfloat16
    baseline = TensorStoreOptions()
    assert baseline.disk_dtype(torch.float16) == torch.float32
    assert baseline.disk_dtype(torch.bfloat16) == torch.float32
    assert baseline.disk_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("name", ["tensorstore", "ts+float16", "ts+ocdbt", "pytorch"])
def test_bfloat16_and_float32_tensors_round_trip(name, tmp_path):
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(70, 65, generator=generator).to(torch.bfloat16),
        "b": torch.randn(130, generator=generator),
        "c": torch.tensor([-0.0, 0.0, float("inf"), float("nan")], dtype=torch.float16),
    }
    strategy = get_strategy(name)
    save_checkpoint(strategy, tensors, tmp_path / "ckpt")
    check_identical(load_checkpoint(strategy, tmp_path / "ckpt"), tensors, name)


def test_get_strategy_unknown_names_the_valid_choices():
    with pytest.raises(UnknownChoiceError) as info:
        get_strategy("ts+magic")
    assert info.value.kind == "strategy"
    assert info.value.name == "ts+magic"
    assert info.value.valid == list(STRATEGIES)
    for name in STRATEGIES:
        assert name in str(info.value)


def test_parse_strategies():
    assert parse_strategies("every") == list(STRATEGIES)
    assert parse_strategies("all") == list(EIGHT_WAY)
    assert parse_strategies("peers") == [name for name in STRATEGIES if name not in EIGHT_WAY]
    assert parse_strategies(" all ") == list(EIGHT_WAY)
    assert parse_strategies("pytorch, ts+chunks") == ["pytorch", "ts+chunks"]
    assert parse_strategies("ts+ocdbt,") == ["ts+ocdbt"]
    assert parse_strategies("all,safetensors,pytorch") == [*EIGHT_WAY, "safetensors"]


@pytest.mark.parametrize("spec", ["pytorch,ts+magic", "nope", "", " , ", "all,ts+magic"])
def test_parse_strategies_rejects_unknown_or_empty(spec):
    with pytest.raises(UnknownChoiceError) as info:
        parse_strategies(spec)
    assert info.value.valid == [*GROUPS, *STRATEGIES]
    assert "valid choices: " + ", ".join([*GROUPS, *STRATEGIES]) in str(info.value)


def test_knobs_describe_every_strategy():
    for name, strategy in ckptbench.STRATEGIES.items():
        knobs = strategy.knobs()
        assert knobs, name
        assert all(isinstance(v, str) for v in knobs.values()), name
    assert get_strategy("ts+ocdbt").knobs()["kvstore"] == "ocdbt"
    assert get_strategy("t5x").knobs()["compression"] == "gzip"


def test_every_strategy_has_a_json_config_naming_its_library():
    for name, strategy in STRATEGIES.items():
        config = strategy.config()
        assert json.loads(json.dumps(config)) == config, name
        assert config["library"], name
        assert strategy.reads(config), name
        assert from_config(name, config) is strategy
    assert get_strategy("ts+ocdbt").config()["driver"] == "ocdbt"


def test_a_sweep_configuration_is_rebuilt_from_its_config():
    options = TensorStoreOptions(chunk_bytes=4 * MiB, compression="zstd")
    rebuilt = from_config("ts[chunk_bytes=4M,compression=zstd]", TensorStore("x", options).config())
    assert isinstance(rebuilt, TensorStore)
    assert rebuilt.options == options
    with pytest.raises(ckptbench.CheckpointError, match="no strategy"):
        from_config("mystery", {"library": "pickle"})


def test_readers_refuse_other_formats():
    assert not get_strategy("tensorstore").reads(get_strategy("ts+ocdbt").config())
    assert not get_strategy("tensorstore").reads(get_strategy("ts+zarr3").config())
    assert get_strategy("tensorstore").reads(get_strategy("ts+chunks").config())
    assert not get_strategy("pytorch").reads(get_strategy("safetensors").config())
    assert get_strategy("pytorch").reads(get_strategy("pytorch+mmap").config())


@pytest.mark.parametrize("io_mode", ["direct", "memmap"])
def test_each_file_io_mode_round_trips_and_reads_what_the_default_wrote(io_mode, tiny, saved, tmp_path):
    strategy = TensorStore(f"ts+best[{io_mode}]", replace(BEST, io_mode=io_mode))
    assert strategy.options.context()["file_io_mode"].to_json() == {"mode": io_mode}
    save_checkpoint(strategy, tiny.tensors, tmp_path / "ckpt")
    check_identical(load_checkpoint(strategy, tmp_path / "ckpt"), tiny.tensors, io_mode)
    check_identical(load_checkpoint(strategy, saved["ts+best"].path), tiny.tensors, f"{io_mode} reading ts+best")


@pytest.mark.parametrize("fresh_memory", ["one-buffer", "huge-pages"])
def test_a_fresh_load_into_one_buffer_is_exact_and_its_views_outlive_the_rest(fresh_memory, tiny, saved):
    strategy = TensorStore(f"ts+best[{fresh_memory}]", replace(BEST, fresh_memory=fresh_memory))
    loaded = load_checkpoint(strategy, saved["ts+best"].path)
    check_identical(loaded, tiny.tensors, fresh_memory)
    storages = {t.untyped_storage().data_ptr() for t in loaded.values()}
    assert len(storages) == 1  # every tensor a view of the one buffer
    name = next(reversed(loaded))
    kept = loaded[name]
    del loaded
    torch.empty(64 << 20, dtype=torch.uint8).fill_(0xA5)  # freed memory would be written over
    assert torch.equal(kept, tiny.tensors[name])


def test_one_buffer_places_every_dtype_and_shape_at_a_page_boundary():
    views = one_buffer([("a", torch.bfloat16, (3, 5)), ("s", torch.float32, ()), ("z", torch.float16, (0, 4))], True)
    assert [(t.dtype, tuple(t.shape)) for t in views.values()] == [
        (torch.bfloat16, (3, 5)),
        (torch.float32, ()),
        (torch.float16, (0, 4)),
    ]
    assert all(t.data_ptr() % 4096 == 0 for t in views.values())
    views["a"].fill_(1.5)
    views["s"].fill_(-2.0)
    assert views["a"].sum().item() == 22.5
    assert views["s"].item() == -2.0
