"""The fast loaders as peers: exact round trips, damage refused in one line, tensors that outlive the loader."""

from __future__ import annotations

import gc
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ckptbench import STRATEGIES, CheckpointError, checkpoint, disk
from ckptbench.bitwise import check_identical

from conftest import load_checkpoint

STREAMERS = ["runai-streamer", "fastsafetensors", "tensorizer"]


def _file(path: Path) -> Path:
    return path / STRATEGIES[path.name].filename


@pytest.mark.parametrize("name", STREAMERS)
def test_a_cold_load_gives_back_every_tensor_bit_for_bit(name, tiny, saved):
    disk.evict(saved[name].path)
    read: list[int] = []
    loaded = load_checkpoint(STRATEGIES[name], saved[name].path, read.append)
    assert list(loaded) == list(tiny.tensors)
    check_identical(loaded, tiny.tensors, name)
    assert sum(read) == tiny.nbytes


def test_the_safetensors_streamers_read_what_the_safetensors_strategy_writes(saved):
    plain = STRATEGIES["safetensors"]
    for name in ("runai-streamer", "fastsafetensors"):
        assert STRATEGIES[name].filename == plain.filename
        assert _file(saved[name].path).read_bytes() == _file(saved["runai-streamer"].path).read_bytes()


@pytest.mark.parametrize("name", STREAMERS)
def test_loaded_tensors_stay_valid_after_the_loader_has_closed(name, tiny, saved):
    """Views of a buffer the loader freed would read whatever the allocator put there next."""
    loaded = load_checkpoint(STRATEGIES[name], saved[name].path)
    gc.collect()
    scribbled = [torch.full_like(t, float("nan")) for t in tiny.tensors.values() for _ in range(2)]
    check_identical(loaded, tiny.tensors, name)
    assert len(scribbled) == 2 * len(tiny.tensors)


@pytest.mark.parametrize("name", STREAMERS)
def test_a_load_into_existing_tensors_fills_them_in_place(name, tiny, saved):
    into = OrderedDict((k, torch.full_like(t, float("nan"))) for k, t in tiny.tensors.items())
    pointers = {k: t.data_ptr() for k, t in into.items()}
    read: list[int] = []
    checkpoint.load(STRATEGIES[name], saved[name].path, read.append, into=into)
    assert all(into[k].data_ptr() == pointers[k] for k in into)
    check_identical(into, tiny.tensors, name)
    assert sum(read) == tiny.nbytes


def test_the_run_ai_streamer_loads_into_existing_tensors_without_a_fresh_copy(tiny, saved, monkeypatch):
    strategy = STRATEGIES["runai-streamer"]

    def refuse(*args, **kwargs):
        raise AssertionError("loaded into fresh memory")

    monkeypatch.setattr(type(strategy), "load", refuse)
    into = OrderedDict((k, torch.full_like(t, float("nan"))) for k, t in tiny.tensors.items())
    checkpoint.load(strategy, saved["runai-streamer"].path, lambda n: None, into=into)
    check_identical(into, tiny.tensors, "runai-streamer")


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _scramble_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[10:14] = b"\xff\xff\xff\xff"
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _scramble_header], ids=["truncated", "header"])
@pytest.mark.parametrize("name", STREAMERS)
@pytest.mark.parametrize("into", [False, True], ids=["fresh", "existing"])
def test_a_damaged_file_is_refused_in_one_line_naming_it(name, damage, into, tiny, saved, tmp_path):
    path = shutil.copytree(saved[name].path, tmp_path / name)
    damage(_file(path))
    existing = OrderedDict((k, torch.empty_like(t)) for k, t in tiny.tensors.items()) if into else None
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(STRATEGIES[name], path, lambda n: None, into=existing)
    message = str(refused.value)
    assert str(_file(path)) in message
    assert "\n" not in message


@pytest.mark.parametrize("name", STREAMERS)
def test_a_flipped_byte_the_loader_takes_is_named_by_verify(name, tiny, saved, tmp_path):
    path = shutil.copytree(saved[name].path, tmp_path / name)
    tensor = "model.layers.3.self_attn.q_proj.weight"
    file = _file(path)
    data = bytearray(file.read_bytes())
    at = data.find(tiny.tensors[tensor][0, :16].numpy().tobytes())
    assert at > 0
    data[at + 3] ^= 0x80
    file.write_bytes(bytes(data))
    found = checkpoint.verify(path)
    assert [d.tensor for d in found.damage] == [tensor]
