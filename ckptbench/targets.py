"""The performance targets: how the best TensorStore configuration compares with its peers and the disk.

Every figure is a ratio of medians measured in the same run, next to its target, so a miss is
reported as measured rather than hidden by moving the goalposts.
"""

from __future__ import annotations

import io
import statistics
import time

import pandas as pd
import psutil
from tqdm.auto import tqdm

from .limits import Limits
from .measure import measure
from .results import TIMES, summarize

BEST, TORCH, SAFETENSORS = "ts+best", "pytorch", "safetensors"
SAVE_VS_TORCH = 1.0
"""ts+best's save time over torch.save's must not exceed this."""
LOAD_VS_SAFETENSORS = 1.0
"""ts+best's cold-load time over safetensors' must not exceed this."""
DISK_FRACTION = 0.8
"""ts+best's throughput as a fraction of the disk's measured limit must reach this."""
OVERHEAD_FRACTION = 0.15
"""Wall time outside the timed regions over the run's wall time must not exceed this."""
HARNESS_FRACTION = 0.05
"""What the harness adds inside a timed region, over the shortest median timed region, must not exceed this."""


def harness_cost(tensors: int, repeats: int = 5) -> float:
    """Seconds the harness adds inside one timed region: timer, memory sampler, one progress update per tensor."""
    costs = []
    for _ in range(repeats):
        start = time.perf_counter()
        with tqdm(total=tensors, file=io.StringIO()) as bar, measure():
            for _ in range(tensors):
                bar.update(1)
        costs.append(time.perf_counter() - start)
    return statistics.median(costs)


def _row(metric: str, value: float, target: str = "", met: bool | None = None) -> dict:
    """``met`` is None for figures shown for context, which have no target."""
    return {
        "metric": metric,
        "measured": round(value, 3),
        "target": target,
        "met": {True: "yes", False: "NO"}.get(met, ""),
    }


def ratios(
    results: pd.DataFrame,
    wall_s: float,
    prepare_s: float = 0.0,
    start_limits: Limits | None = None,
    end_limits: Limits | None = None,
) -> pd.DataFrame:
    """The target ratios the measured strategies allow, each strategy's share of the disk, and the overhead.

    ``results`` are one run's rows; ``wall_s`` is that run's wall time from start to end, of which
    ``prepare_s`` went to set-up, including the disk probe ``start_limits``. ``end_limits``, the disk
    probed again after the strategies, shows whether the disk the shares divide by held still.
    Both probes' timed I/O counts as measurement.
    """
    probes = [limits for limits in (start_limits, end_limits) if limits is not None]
    probe_s = sum(limits.probe_s for limits in probes)
    set_up_s = prepare_s - (start_limits.probe_s if start_limits is not None else 0.0)
    summary = summarize(results)
    cores = psutil.cpu_count() or 1
    busy = (results["cpu_load_cold_s"] / results["load_cold_s"] / cores).groupby(results["strategy"]).median()
    disk_write_gbps, disk_read_gbps = results["disk_write_gbps"].median(), results["disk_read_gbps"].median()
    rows = []
    if end_limits is not None:
        for limit, start, end in (
            ("durable write", disk_write_gbps, end_limits.write_gbps),
            ("cold read", disk_read_gbps, end_limits.read_gbps),
        ):
            rows.append(_row(f"disk's {limit} probed after the strategies / before them (1: steady)", end / start))
    if {BEST, TORCH} <= set(summary.index):
        value = summary.loc[BEST, "save_s_median"] / summary.loc[TORCH, "save_s_median"]
        rows.append(_row(f"{BEST} save / {TORCH} save", value, f"<= {SAVE_VS_TORCH}", value <= SAVE_VS_TORCH))
    if {BEST, SAFETENSORS} <= set(summary.index):
        value = summary.loc[BEST, "load_cold_s_median"] / summary.loc[SAFETENSORS, "load_cold_s_median"]
        met = value <= LOAD_VS_SAFETENSORS
        rows.append(_row(f"{BEST} cold load / {SAFETENSORS} cold load", value, f"<= {LOAD_VS_SAFETENSORS}", met))
    for name, s in summary.iterrows():
        write = s["bytes"] / s["save_s_median"] / 1e9
        read = s["bytes"] / s["load_cold_s_median"] / 1e9
        cached = s["bytes"] / s["load_warm_s_median"] / 1e9
        targeted = name == BEST
        target = f">= {DISK_FRACTION}" if targeted else ""
        for verb, value, limit in (
            ("written", write / disk_write_gbps, "durable write"),
            ("read", read / disk_read_gbps, "cold read"),
        ):
            met = value >= DISK_FRACTION if targeted else None
            rows.append(_row(f"{name}: bytes {verb} / s as a share of the disk's {limit}", value, target, met))
        # A warm load does all of a load's work but the disk's: its rate caps what a cold load could reach.
        rows.append(
            _row(
                f"{name}: bytes read / s warm (no disk, the load's own work) as a share of the disk's cold read",
                cached / disk_read_gbps,
            )
        )
        rows.append(_row(f"{name}: CPU time during the cold load / (its wall time x {cores} cores)", busy[name]))
    shortest = summary[[f"{t}_median" for t in TIMES]].to_numpy().min()
    cost = harness_cost(int(results["tensors"].max()))
    rows.append(
        _row(
            "harness cost inside a timed region / shortest timed region",
            cost / shortest,
            f"<= {HARNESS_FRACTION}",
            cost / shortest <= HARNESS_FRACTION,
        )
    )
    overhead = 1 - (results[list(TIMES)].to_numpy().sum() + probe_s) / wall_s
    rows.append(
        _row(
            "wall time outside timed regions (the strategies' and the disk probes') / run wall time",
            overhead,
            f"<= {OVERHEAD_FRACTION}",
            overhead <= OVERHEAD_FRACTION,
        )
    )
    rows.append(_row("  of which set-up (model build, cleanup) / run wall time", set_up_s / wall_s))
    rows.append(
        _row(
            "  of which per repeat (eviction, verification, deletion, warm-up) / run wall time",
            results["overhead_s"].sum() / wall_s,
        )
    )
    rows.append(_row("  the same, counting the disk probes' I/O as overhead too", overhead + probe_s / wall_s))
    return pd.DataFrame(rows)
