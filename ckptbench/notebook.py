"""The notebook's side of a session: what the setup cell shows, and one phase per cell.

main.ipynb stays thin: every cell calls one function here or in ``report``; what measures is the
``Benchmark`` it is given, and what a cell shows comes from ``report``'s tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .benchmark import Benchmark, PhaseResult
from .report import phase_table, summary_table
from .results import summarize
from .strategies import get_strategy
from .study import parse_strategies


@dataclass(frozen=True)
class Shown:
    """A phase as its cell shows it: the phase's table; ``result`` is what was measured."""

    result: PhaseResult

    def _repr_html_(self) -> str:
        return phase_table(self.result).to_html()

    def __repr__(self) -> str:
        return phase_table(self.result).to_string()


def describe(bench: Benchmark) -> pd.DataFrame:
    """The model and everything its numbers depend on (versions, CPU, RAM, disk), one row per item."""
    env = bench.environment()
    items = {
        "run id": env["run_id"],
        "model": env["model"],
        "tensors": env["tensors"],
        "parameters": None if env["params"] is None else f"{env['params']:,}",
        "size in memory": None if env["model_bytes"] is None else f"{env['model_bytes'] / 1e9:.3g} GB",
        "disk limits": None if bench.limits is None else bench.limits.describe(),
        "repeats": f"{env['repeats']}, {env['order']} order",
        "output folder": str(bench.out.resolve()),
        "checkpoints in": bench.storage.url,
        "filesystem": env["filesystem"],
        "free disk": f"{env['disk_free_bytes'] / 1e9:.1f} GB of {env['disk_total_bytes'] / 1e9:.1f} GB",
        "CPU": f"{env['cpu']} ({env['cores']} cores)",
        "RAM": f"{env['ram_bytes'] / 2**30:.1f} GiB",
        "python": f"{env['python']} on {env['platform']}",
        **env["packages"],
        "git commit": env["git_commit"],
    }
    return pd.DataFrame({"value": items}).rename_axis("item")


@dataclass
class Phases:
    """The notebook's phases: ``measure_all()`` runs every selected one in the run's order (interleaved by
    default); each phase cell then shows its phase, and a phase cell re-run on its own measures that
    phase again (all its repeats in a row)."""

    bench: Benchmark
    strategies: str = "all"
    selected: list[str] = field(init=False)
    _unshown: dict[str, PhaseResult] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.selected = parse_strategies(self.strategies) if self.strategies.strip() else []

    def measure_all(self) -> pd.DataFrame:
        """Every selected phase, in the run's order; the summary of what they measured."""
        if not self.selected:
            print("nothing selected")
            return summary_table(summarize(self.bench.results))
        config = self.bench.config
        print(f"{len(self.selected)} strategies x {config.repeats} repeats, {config.order} order")
        self._unshown = {p.strategy: p for p in self.bench.run(self.selected)}
        return summary_table(summarize(self.bench.results[self.bench.results["strategy"].isin(self.selected)]))

    def __call__(self, name: str) -> Shown | None:
        get_strategy(name)
        if name not in self.selected:
            print(f"skipped {name}: not in {self.strategies!r}")
            return None
        if name in self._unshown:
            return Shown(self._unshown.pop(name))
        return Shown(self.bench.run_phase(name))
