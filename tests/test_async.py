"""Async saves: they return before the checkpoint is durable, keep what they were given, and leave nothing running."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import replace

import pandas as pd
import pytest

from ckptbench import STRATEGIES, manifest, plot, report
from ckptbench.bitwise import check_identical
from ckptbench.local import Folder
from ckptbench.location import staged
from ckptbench.manifest import Manifest
from ckptbench.results import Row, frame, summarize
from ckptbench.strategies import BEST, TensorStore
from ckptbench.study import ASYNC

from conftest import load_checkpoint


def test_the_async_strategies_are_registered():
    assert set(ASYNC) <= set(STRATEGIES)
    assert {"orbax+async", "dcp+async", "ts+best+async"} == set(ASYNC)


SNAPSHOTS = [STRATEGIES[n] for n in ASYNC] + [
    TensorStore(f"ts+best+async[{where}]", replace(BEST, background=True, fresh_memory=where))
    for where in ("one-buffer", "huge-pages")
]


@pytest.mark.parametrize("strategy", SNAPSHOTS, ids=lambda s: s.name)
def test_an_async_save_keeps_what_it_was_given_when_training_changes_it_at_once(strategy, tiny, tmp_path):
    """Tensors changed the moment ``save`` returns must not reach the checkpoint: the strategy took its own copy."""
    name = strategy.name
    original = tiny.tensors
    live = OrderedDict((k, t.clone()) for k, t in original.items())
    layout = manifest.layout(live, manifest.digests(live))
    before = set(threading.enumerate())
    written: list[int] = []
    with staged(Folder(tmp_path / "ckpt")) as staging:
        pending = strategy.save(live, staging.partial, written.append)
        assert pending is not None
        for tensor in live.values():
            tensor.zero_()
        pending()
        staging.commit(Manifest(strategy.name, strategy.config(), layout))
    assert sum(written) == tiny.nbytes
    for thread in set(threading.enumerate()) - before:  # a library's pool thread may still be exiting, not writing
        thread.join(timeout=5)
    assert set(threading.enumerate()) <= before
    check_identical(load_checkpoint(strategy, tmp_path / "ckpt"), original, name)


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in ASYNC])
def test_every_other_strategy_is_synchronous(name, tiny, tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    subset = OrderedDict(list(tiny.tensors.items())[:3])
    assert STRATEGIES[name].save(subset, Folder(path), lambda n: None) is None


@pytest.mark.slow
def test_blocking_is_recorded_beside_durable(make_bench):
    rows = make_bench().run(["pytorch", "ts+best+async", "dcp+async"])
    by_name = {phase.strategy: phase.rows[0] for phase in rows}
    assert all(phase.ok for phase in rows)
    assert by_name["pytorch"].save_blocking_s == by_name["pytorch"].save_s
    for name in ("ts+best+async", "dcp+async"):
        assert 0 < by_name[name].save_blocking_s < by_name[name].save_s


def _rows(**timings: tuple[float, float]) -> pd.DataFrame:
    """One verified row per strategy with (save_s, save_blocking_s)."""
    measured = {"load_cold_s": 1.0, "load_warm_s": 0.5, "bytes": 10**9, "files": 1, "verified": True}
    disk = {"disk_write_gbps": 1.0, "disk_read_gbps": 1.0}
    return frame(
        Row("run", "t", "tiny", name, "{}", 0, 238, 1, 10**9, save_s=save, save_blocking_s=blocking, **measured, **disk)
        for name, (save, blocking) in timings.items()
    )


def test_the_summary_shows_blocking_time_only_for_async_saves():
    table = report.summary_table(summarize(_rows(pytorch=(2.0, 2.0), **{"ts+best+async": (1.5, 0.25)})))
    assert list(table.columns[:3]) == ["repeats", "save s", "blocking s"]
    assert table.loc["ts+best+async", "blocking s"] == "0.25"
    assert table.loc["pytorch", "blocking s"] == ""
    assert "blocking s" not in report.summary_table(summarize(_rows(pytorch=(2.0, 2.0))))


def test_the_figure_draws_an_async_saves_stall_inside_its_save_bar():
    results = _rows(pytorch=(2.0, 2.0), safetensors=(1.0, 1.0), **{"ts+best+async": (1.5, 0.25)})
    save_ax = plot.comparison_figure(results).axes[0]
    heights = sorted(round(bar.get_height(), 6) for bar in save_ax.patches if not math.isnan(bar.get_height()))
    assert heights == [0.25, 1.0, 1.5, 2.0]  # three save bars and one inner blocking bar
    legend = " ".join(t.get_text() for t in plot.comparison_figure(results).legends[0].get_texts())
    assert "blocking" in legend
    synchronous = plot.comparison_figure(_rows(pytorch=(2.0, 2.0)))
    assert len(synchronous.axes[0].patches) == 1
    assert "blocking" not in " ".join(t.get_text() for t in synchronous.legends[0].get_texts())
