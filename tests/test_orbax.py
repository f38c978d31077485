"""Orbax as a peer: exact round trips through the harness's staging, its choices read from its files, quiet and tidy."""

from __future__ import annotations

import gc
import logging
import shutil
import threading
from collections import OrderedDict

import pytest
import torch

from ckptbench import STRATEGIES, CheckpointError, checkpoint
from ckptbench.bitwise import check_identical
from ckptbench.manifest import MANIFEST
from ckptbench.model import ROTARY_BUFFER
from ckptbench.strategies import Orbax
from ckptbench.strategies.orbax import SUBFOLDER, describe

from conftest import load_checkpoint, save_checkpoint

ORBAX = [name for name, s in STRATEGIES.items() if isinstance(s, Orbax)]


def test_the_registry_has_orbax_with_its_defaults_without_compression_and_async():
    assert {"orbax", "orbax+uncompressed", "orbax+async"} <= set(ORBAX)
    assert STRATEGIES["orbax"] == Orbax("orbax")
    assert not STRATEGIES["orbax+uncompressed"].compression
    assert STRATEGIES["orbax+async"].asynchronous


@pytest.mark.parametrize("name", ORBAX)
def test_round_trip_is_bit_exact_in_the_saved_order_and_dtypes(name, tiny, saved):
    path, usage = saved[name].path, saved[name].usage
    loaded = load_checkpoint(STRATEGIES[name], path)
    check_identical(loaded, tiny.tensors, name)  # names, order, dtypes, shapes and bits
    assert loaded["model.embed_tokens.weight"].dtype == torch.float16
    assert loaded[ROTARY_BUFFER].dtype == torch.float32
    assert usage.bytes <= STRATEGIES[name].estimate_bytes(tiny.tensors)


@pytest.mark.parametrize("name", ORBAX)
def test_orbax_writes_inside_the_staged_directory(name, saved):
    path = saved[name].path
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST, SUBFOLDER])
    assert (path / SUBFOLDER / "commit_success.txt").is_file()
    assert not list(path.parent.glob("*orbax-checkpoint-tmp*"))
    assert not list(path.rglob("*orbax-checkpoint-tmp*"))


def test_knobs_are_what_its_files_say(tiny, saved):
    name = next(iter(tiny.tensors))
    for strategy in ORBAX:
        stored = describe(saved[strategy].path / SUBFOLDER, name)
        knobs = STRATEGIES[strategy].knobs()
        assert {k: knobs[k] for k in stored} == stored, strategy
    assert STRATEGIES["orbax"].knobs()["compression"] != "none"
    assert STRATEGIES["orbax+uncompressed"].knobs()["compression"] == "none"
    assert STRATEGIES["orbax"].knobs()["chunks"] == "one per array"


def test_compression_changes_the_bytes_not_the_layout(tiny, saved):
    compressed, raw = saved["orbax"], saved["orbax+uncompressed"]
    assert compressed.usage.bytes < raw.usage.bytes  # the tiny model's normal(0, 0.02) weights compress
    for name in tiny.tensors:  # every array stored alike (format, chunks, kvstore) but for its compression
        packed, plain = describe(compressed.path / SUBFOLDER, name), describe(raw.path / SUBFOLDER, name)
        assert (packed.pop("compression"), plain.pop("compression")) == ("zstd level 1", "none"), name
        assert packed == plain, name


def test_bfloat16_round_trips(tmp_path):
    tensors = {"b": torch.randn(40, 3).to(torch.bfloat16), "a": torch.randn(7)}
    save_checkpoint(STRATEGIES["orbax"], tensors, tmp_path / "ckpt")
    check_identical(load_checkpoint(STRATEGIES["orbax"], tmp_path / "ckpt"), tensors, "orbax")


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_checkpoint_is_refused_and_verify_names_each_damaged_tensor(tiny, tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(STRATEGIES["orbax"], tiny.tensors, path)
    largest = max((p for p in (path / SUBFOLDER).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.unlink()
    found = checkpoint.verify(path)
    assert 0 < len(found.damage) <= len(tiny.tensors)
    assert all(d.problem.startswith("unreadable") for d in found.damage)
    into = OrderedDict((k, torch.empty_like(t)) for k, t in tiny.tensors.items())
    with pytest.raises(CheckpointError, match="unreadable Orbax checkpoint"):
        checkpoint.load(STRATEGIES["orbax"], path, lambda n: None, into=into)
    gc.collect()


def test_a_checkpoint_without_orbax_files_is_refused(tiny, tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(STRATEGIES["orbax"], tiny.tensors, path)
    shutil.rmtree(path / SUBFOLDER)
    with pytest.raises(CheckpointError, match="not a complete Orbax checkpoint"):
        load_checkpoint(STRATEGIES["orbax"], path)


def test_orbax_leaves_no_thread_and_logs_nothing(tiny, tmp_path, caplog, capfd):
    before = set(threading.enumerate())
    with caplog.at_level(logging.INFO):
        for name in ("orbax", "orbax+async"):
            save_checkpoint(STRATEGIES[name], tiny.tensors, tmp_path / name)
            load_checkpoint(STRATEGIES[name], tmp_path / name)
    assert set(threading.enumerate()) <= before
    assert not [r for r in caplog.records if r.name == "absl"]
    captured = capfd.readouterr()
    assert captured.out == captured.err == ""
