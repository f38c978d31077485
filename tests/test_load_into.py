"""Loads into a live model: every strategy fills existing tensors in place, exactly, and the harness measures it."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from ckptbench import STRATEGIES, CheckpointError, RunConfig, UsageError, checkpoint, disk
from ckptbench.bitwise import check_identical
from ckptbench.strategies import Strategy, total_bytes

from conftest import save_checkpoint

IN_PLACE = ["ts+chunks", "ts+best", "safetensors", "dcp", "orbax", "orbax+uncompressed"]
"""Strategies that read straight into the given tensors (``ts+chunks`` casting float32 on disk back to float16);
``pytorch`` loads fresh and copies (the default)."""


def _poisoned(tensors) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, torch.full_like(t, float("nan"))) for k, t in tensors.items())


@pytest.mark.parametrize("name", [*IN_PLACE, "pytorch", "pytorch+mmap"])
def test_a_load_into_existing_tensors_fills_them_exactly_in_place(name, tiny, saved):
    into = _poisoned(tiny.tensors)
    pointers = {k: t.data_ptr() for k, t in into.items()}
    read: list[int] = []
    disk.evict(saved[name].path)
    loaded = checkpoint.load(STRATEGIES[name], saved[name].path, read.append, into=into)
    assert all(loaded[k] is into[k] and into[k].data_ptr() == pointers[k] for k in into)
    check_identical(into, tiny.tensors, name)
    assert sum(read) == tiny.nbytes


@pytest.mark.parametrize("name", IN_PLACE)
def test_in_place_loads_allocate_no_copy_of_the_model(name, tiny, saved, monkeypatch):
    """A strategy that read fresh and copied would call its own ``load``; these never do."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded into fresh memory")

    monkeypatch.setattr(type(STRATEGIES[name]), "load", refuse)
    into = _poisoned(tiny.tensors)
    checkpoint.load(STRATEGIES[name], saved[name].path, lambda n: None, into=into)
    check_identical(into, tiny.tensors, name)


@pytest.mark.parametrize("name", IN_PLACE)
def test_non_contiguous_destinations_are_filled_too(name, tiny, saved):
    into = OrderedDict((k, torch.full(t.shape[::-1], float("nan"), dtype=t.dtype).t()) for k, t in tiny.tensors.items())
    assert not into["lm_head.weight"].is_contiguous()
    checkpoint.load(STRATEGIES[name], saved[name].path, lambda n: None, into=into)
    check_identical(into, tiny.tensors, name)


def test_tensors_that_do_not_match_the_checkpoint_are_refused(tiny, saved):
    into = _poisoned(tiny.tensors)
    name = next(iter(into))
    into[name] = into[name].to(torch.float32)
    with pytest.raises(CheckpointError, match=name):
        checkpoint.load(STRATEGIES["safetensors"], saved["safetensors"].path, lambda n: None, into=into)


def test_a_truncated_safetensors_file_is_named(tiny, tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(STRATEGIES["safetensors"], tiny.tensors, path)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="early"):
        checkpoint.load(STRATEGIES["safetensors"], path, lambda n: None, into=_poisoned(tiny.tensors))


def test_the_harness_loads_into_existing_tensors_and_counts_them_as_the_loaded_copy(make_bench, tiny):
    phases = make_bench(load_into="existing").run(["ts+best", "safetensors"])
    assert all(phase.ok for phase in phases)
    for phase in phases:
        row = phase.rows[0]
        assert row.load_into == "existing"
        assert row.peak_rss_load >= total_bytes(tiny.tensors)
    assert make_bench().run_phase("pytorch").rows[0].load_into == "fresh"


def test_a_strategy_that_leaves_the_existing_tensors_alone_fails_verification(make_bench, monkeypatch):
    strategy: Strategy = STRATEGIES["ts+best"]
    monkeypatch.setattr(type(strategy), "load_into", lambda self, directory, entries, into, progress: None)
    phase = make_bench(load_into="existing").run_phase("ts+best")
    assert not phase.ok
    assert not phase.rows[0].verified


def test_an_unknown_load_mode_is_refused(tmp_path):
    with pytest.raises(UsageError, match="load_into must be one of fresh, existing"):
        RunConfig(preset="tiny", out=tmp_path, load_into="live")
