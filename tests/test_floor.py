"""The modelled floor and the resource that bound each save and cold load, on constructed rows."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ckptbench import floor, targets, yourdisk
from ckptbench.results import COLUMNS
from ckptbench.rounds import Interval

CORES = 2
LIMITS = {"disk_write_gbps": 1.0, "disk_read_gbps": 2.0, "disk_files_per_s": 1000.0, "fresh_copy_gbps": 4.0}


def _rows(**strategies: dict) -> pd.DataFrame:
    """Two identical repeats per strategy: 1 GB in 2 files, at the limits above, with the given measurements."""
    rows = []
    for name, measured in strategies.items():
        row = dict.fromkeys(COLUMNS) | LIMITS
        row |= {"strategy": name, "error": "", "verified": True, "tensors": 238, "overhead_s": 0.0}
        row |= {"bytes": 10**9, "model_bytes": 10**9, "files": 2, "cpu_save_s": 0.0, "cpu_load_cold_s": 0.0}
        row |= measured
        rows += [row, row]
    return pd.DataFrame(rows, columns=COLUMNS)


def test_the_floor_adds_the_files_to_the_bytes():
    assert floor.save_floor_s(2e9, 1000, 1.0, 500.0) == pytest.approx(2.0 + 2.0)
    assert floor.load_floor_s(2e9, 1e9, 2.0, 0.5) == pytest.approx(1.0 + 2.0)


def test_floors_per_strategy_from_its_own_bytes_files_and_the_rows_limits():
    results = _rows(
        one={"save_s": 2.0, "load_cold_s": 1.0, "load_warm_s": 0.5},
        many={"save_s": 90.0, "load_cold_s": 9.0, "load_warm_s": 8.0, "files": 80_000, "bytes": 2 * 10**9},
    )
    floors = floor.floors(results)
    assert floors.loc["one", "save_floor_s"] == pytest.approx(1.0 + 2 / 1000)
    assert floors.loc["many", "save_floor_s"] == pytest.approx(2.0 + 80.0)
    assert floors.loc["one", "load_floor_s"] == pytest.approx(0.5 + 0.25)
    assert floors.loc["many", "load_floor_s"] == pytest.approx(1.0 + 0.25)  # the model's bytes, in memory


def test_without_a_recorded_file_rate_there_is_no_floor():
    results = _rows(old={"save_s": 2.0, "load_cold_s": 1.0, "load_warm_s": 0.5}).assign(disk_files_per_s=None)
    assert math.isnan(floor.floors(results).loc["old", "save_floor_s"])


CONSTRUCTED = {
    # 1 GB at 1 GB/s is 1 s of a 1.4 s save: the disk's bandwidth accounts for 71 %
    "bandwidth": {"save_s": 1.4, "load_cold_s": 0.7, "load_warm_s": 0.1},
    # 2,000 files at 1,000/s are 2 s of a 2.5 s save
    "files": {"save_s": 2.5, "files": 2000, "load_cold_s": 0.7, "load_warm_s": 0.1},
    # both cores busy 90 % of the save; the warm load alone takes 90 % of the cold one
    "cpu": {"save_s": 5.0, "cpu_save_s": 9.0, "load_cold_s": 5.0, "load_warm_s": 4.5, "cpu_load_cold_s": 9.0},
    # nothing measured comes close
    "stalls": {"save_s": 10.0, "load_cold_s": 10.0, "load_warm_s": 1.0},
    # at the disk: 1 GB in 1.05 s and 0.5 s
    "fast": {"save_s": 1.05, "load_cold_s": 0.5, "load_warm_s": 0.1},
}


def test_each_operation_is_attributed_to_the_resource_that_accounts_for_most_of_it():
    found = {(b.strategy, b.op): b for b in floor.bounds(_rows(**CONSTRUCTED), CORES)}
    assert found["bandwidth", "save"].resource == "disk bandwidth"
    assert found["bandwidth", "save"].largest.share == pytest.approx(1 / 1.4)
    assert found["files", "save"].resource == "file creation"
    assert found["files", "save"].largest.share == pytest.approx(2 / 2.5)
    assert found["cpu", "save"].resource == "CPU / page faults"
    assert found["cpu", "save"].largest.share == pytest.approx(0.9)
    assert found["stalls", "save"].resource is None
    assert found["bandwidth", "load"].resource == "disk bandwidth"
    assert found["cpu", "load"].resource == "CPU / page faults"
    assert found["cpu", "load"].largest.share == pytest.approx(0.9)
    assert found["stalls", "load"].resource is None
    assert "2,000 files at 1,000 files/s = 2 s" in str(found["files", "save"])
    assert "no measured limit explains it" in str(found["stalls", "save"])


def test_a_load_whose_page_faults_alone_take_most_of_it_is_bound_by_them():
    # 3 M faults of a 4 KiB page at the rows' 4 GB/s fresh-copy rate: 3.07 s of a 5 s cold load, itself CPU-bound
    faulting = {"load_cold_s": 5.0, "load_warm_s": 4.5, "minor_faults_load_cold": 3_000_000, "save_s": 1.4}
    # the same CPU-bound load with a tenth of the faults: 0.31 s of it, so the CPU stays the named bound
    computing = faulting | {"minor_faults_load_cold": 300_000}
    results = _rows(faulting=faulting, computing=computing)
    found = {(b.strategy, b.op): b for b in floor.bounds(results, CORES)}
    assert found["faulting", "load"].resource == "page faults"
    assert found["faulting", "load"].largest.share == pytest.approx(3_000_000 * 4096 / 4e9 / 5.0)
    assert found["computing", "load"].resource == "CPU / page faults"
    faults = next(s for s in found["computing", "load"].shares if s.resource == "page faults")
    assert faults.share == pytest.approx(300_000 * 4096 / 4e9 / 5.0)
    table = targets.evaluate(results, wall_s=1000.0, cores=CORES).set_index("key")
    assert "bound by page faults, 3,000,000 minor faults at 1 us each" in table.loc["load_bound:faulting", "label"]
    assert "bound by CPU / page faults" in table.loc["load_bound:computing", "label"]


def test_rows_without_fault_counts_name_no_fault_share():
    found = floor.bounds(_rows(old={"save_s": 5.0, "load_cold_s": 5.0, "load_warm_s": 4.5}), CORES)
    for bound in found:
        faults = next(s for s in bound.shares if s.resource == "page faults")
        assert math.isnan(faults.share)
        assert bound.resource != "page faults"


def test_a_resource_longer_than_the_operation_says_the_probe_fell_short():
    results = _rows(quick={"save_s": 1.0, "files": 5000, "load_cold_s": 1.0, "load_warm_s": 0.1})
    (save, _) = floor.bounds(results, CORES)
    assert save.resource == "file creation"
    assert "beyond the probe's limit" in str(save)


def test_bench_names_what_bound_every_miss_and_nothing_for_a_strategy_at_the_disk():
    table = targets.evaluate(_rows(**CONSTRUCTED), wall_s=1000.0, cores=CORES).set_index("key")
    assert table.loc["write_share:fast", "value"] == pytest.approx(1 / 1.05)  # against the ceiling in the rows
    assert table.loc["read_share:fast", "value"] == pytest.approx(1.0)
    assert "save_bound:fast" not in table.index
    assert "load_bound:fast" not in table.index
    for name, resource in (("bandwidth", "disk bandwidth"), ("files", "file creation"), ("cpu", "CPU / page faults")):
        assert f"bound by {resource}" in table.loc[f"save_bound:{name}", "label"]
    assert table.loc["save_bound:files", "value"] == pytest.approx(0.8)
    assert "no measured limit explains it" in table.loc["save_bound:stalls", "label"]
    assert "bound by CPU / page faults" in table.loc["load_bound:cpu", "label"]
    assert table.loc["save_floor:files", "value"] == pytest.approx((1.0 + 2.0) / 2.5)
    assert table.loc["load_floor:fast", "value"] == pytest.approx((0.5 + 0.25) / 0.5)
    assert table.loc["save_bound:files", "met"] is None  # context, not a target


def test_under_an_operation_cap_a_load_reads_each_file_once_at_least():
    results = _rows(many={"save_s": 90.0, "load_cold_s": 40.0, "load_warm_s": 1.0, "files": 80_000}).assign(
        disk_read_iops=4000.0
    )
    # both caps hold the reads at once: the slower (80,000 reads at 4,000/s) beats 1 GB at 2 GB/s
    assert floor.floors(results).loc["many", "load_floor_s"] == pytest.approx(80_000 / 4000 + 0.25)
    (load,) = [b for b in floor.bounds(results, CORES) if b.op == "load"]
    assert load.resource == "read operations"


def test_rows_faster_than_their_caps_are_named():
    capped = {"disk_caps": "read=1000000000,write=500000000", "disk_profile": "custom"}
    results = _rows(
        held={"save_s": 2.0, "load_cold_s": 1.0, "load_warm_s": 0.5, **capped},
        escaped={"save_s": 1.0, "load_cold_s": 1.0, "load_warm_s": 0.5, **capped},  # 1 GB/s written, 0.5 GB/s cap
        # 12.6 MB in 0.02 s: the throttle's first slice (0.1 s at 0.5 GB/s) holds 50 MB, so nothing escaped
        burst={"save_s": 0.02, "load_cold_s": 0.01, "load_warm_s": 0.01, "bytes": 12_600_000, **capped},
        small_escaped={"save_s": 0.02, "load_cold_s": 1.0, "load_warm_s": 0.01, "bytes": 120_000_000, **capped},
    )
    over = yourdisk.over_caps(results)
    assert set(over["strategy"]) == {"escaped", "small_escaped"}
    table = yourdisk.table(results)
    assert table.loc["held", "fastest write of cap"] == "100%"
    assert table.loc["escaped", "fastest write of cap"] == "200%"
    over = f"rows over {yourdisk.ALLOWANCE} x caps"
    assert (table.loc["held", over], table.loc["escaped", over]) == ("0 of 2", "2 of 2")
    assert yourdisk.check(results) == "caps check: 4 of 8 rows wrote or read faster than 1.05 x the bandwidth caps"
    held = results[results["strategy"].isin(["held", "burst"])]
    assert yourdisk.check(held) == "caps check: none of 4 rows wrote or read faster than 1.05 x the bandwidth caps"
    raw = results.assign(disk_caps="", disk_profile="none")
    assert yourdisk.check(raw) == "caps check: no completed row ran under a bandwidth cap"


def _pair(moves: dict[str, float], width: float) -> pd.DataFrame:
    """``compare``'s medians of an A/A pair: each strategy's save moved by ``moves[name]``, intervals ``width`` wide."""
    rows = []
    for name, moved in moves.items():
        a = Interval(1.0, 1 - width / 2, 1 + width / 2, "")
        b = Interval(1 + moved, (1 + moved) * (1 - width / 2), (1 + moved) * (1 + width / 2), "")
        rows.append(
            {"strategy": name, "metric": "save s", "A": a, "B": b, "B / A": b.value / a.value}
            | {"A covers B": a.covers(b.value), "B covers A": b.covers(a.value)}
        )
    return pd.DataFrame(rows)


def test_a_pair_is_tighter_than_another_only_when_most_strategies_say_so():
    names = [f"s{i}" for i in range(6)]
    raw, steady = _pair(dict.fromkeys(names, 0.2), width=0.3), _pair(dict.fromkeys(names, 0.02), width=0.05)
    found = yourdisk.tighter(raw, steady).set_index("timing")
    assert list(found.index) == ["save s", "all"]
    assert (found.loc["all", "move: verdict"], found.loc["all", "width: verdict"]) == (yourdisk.TIGHTER,) * 2
    assert yourdisk.tighter(steady, raw).set_index("timing").loc["all", "move: verdict"] == yourdisk.LOOSER
    mixed = _pair(dict.fromkeys(names[:3], 0.02) | dict.fromkeys(names[3:], 0.4), width=0.3)
    assert yourdisk.tighter(raw, mixed).set_index("timing").loc["all", "move: verdict"] == yourdisk.TIE
    few = yourdisk.tighter(raw.head(4), steady.head(4)).set_index("timing")
    assert few.loc["all", "move: verdict"] == yourdisk.TOO_FEW
    table = yourdisk.spread({"raw": raw, "steady": steady}).set_index("pair")
    assert table.loc["raw", "median move"] == "20%"
    assert table.loc["steady", "intervals holding the other run's median"] == "12 of 12"
    assert table.loc["raw", "intervals holding the other run's median"] == "0 of 12"
