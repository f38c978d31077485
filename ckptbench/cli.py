"""``python -m ckptbench``: run, sweep or bench headless, redraw a run's figures, or list the strategies."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from . import limits, model, plot, report, sweep, targets
from .benchmark import Benchmark
from .errors import CkptbenchError, UnknownChoiceError
from .strategies import EIGHT_WAY, STRATEGIES, parse_strategies
from .sweep import KNOBS

DEFAULT_OUT = Path("saved_models")
BENCH_STRATEGIES = ("pytorch", "safetensors", "ts+best")
BENCH_FILE = "bench.csv"


def _session_options() -> argparse.ArgumentParser:
    """Options shared by every command that measures: the model, the repeats, the output folder."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--preset", default=model.DEFAULT_PRESET, choices=list(model.PRESETS))
    options.add_argument("--model-path", type=Path, help="local Hugging Face Llama directory (config + safetensors)")
    options.add_argument("--repeats", type=int, default=1)
    options.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results, figures and summaries go here")
    options.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up")
    options.add_argument("--seed", type=int, default=0)
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ckptbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    session = _session_options()
    run = commands.add_parser("run", parents=[session], help="save and load the model each way, timed and verified")
    run.add_argument(
        "--strategies",
        default="all",
        help=f"'all' (the eight), 'every' (all {len(STRATEGIES)}) or a comma list of: {', '.join(STRATEGIES)}",
    )
    run.add_argument("--keep-checkpoints", action="store_true", help="keep each strategy's last checkpoint on disk")
    sweep_cmd = commands.add_parser("sweep", parents=[session], help="the TensorStore writer over a grid of knobs")
    sweep_cmd.add_argument(
        "--knob", action="append", required=True, metavar="NAME=V1,V2", help=f"repeatable; NAME: {', '.join(KNOBS)}"
    )
    bench_cmd = commands.add_parser("bench", parents=[session], help="ts+best against its peers and the disk")
    bench_cmd.add_argument("--strategies", default=",".join(BENCH_STRATEGIES), help="comma list of strategies")
    plot = commands.add_parser("plot", help="draw one run's comparison figure and summary from a results CSV")
    plot.add_argument("--results", type=Path, default=DEFAULT_OUT / "results.csv")
    plot.add_argument("--out", type=Path, help="where the figure and summary.csv go (default: the CSV's folder)")
    plot.add_argument("--run-id", help="the run to draw (default: the latest in the file)")
    commands.add_parser("list", help="the strategies and their knobs")
    return parser


def _list() -> None:
    table = pd.DataFrame.from_dict({name: s.knobs() for name, s in STRATEGIES.items()}, orient="index").fillna("")
    table.insert(0, "8-way", ["yes" if name in EIGHT_WAY else "" for name in table.index])
    print(table.to_string())


def _session(args: argparse.Namespace, parser: argparse.ArgumentParser, **extra) -> Benchmark:
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    bench = Benchmark(
        preset=args.preset,
        model_path=args.model_path,
        out=args.out,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        **extra,
    )
    checkpoint = bench.prepare()
    print(
        f"{checkpoint.source}: {len(checkpoint.tensors)} tensors, {checkpoint.params:,} parameters, "
        f"{checkpoint.nbytes / 1e9:.2f} GB; disk: {bench.limits.write_gbps:.2f} GB/s durable write, "
        f"{bench.limits.read_gbps:.2f} GB/s cold read"
    )
    return bench


def _print_summary(summary: pd.DataFrame) -> None:
    shown = summary[list(report.SUMMARY_COLUMNS)].rename(columns=report.SUMMARY_COLUMNS)
    print(shown.to_string(float_format="{:.3f}".format))


def _finish(bench: Benchmark, failed: list[str]) -> int:
    print(f"results: {bench.store.csv}\nenvironment: {bench.store.environment_path(bench.run_id)}")
    if failed:
        print(f"error: not verified: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _strategies(spec: str, parser: argparse.ArgumentParser) -> list[str]:
    try:
        return parse_strategies(spec)
    except UnknownChoiceError as err:
        parser.error(str(err))


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    names = _strategies(args.strategies, parser)
    bench = _session(args, parser, keep_checkpoints=args.keep_checkpoints)
    failed = bench.run_each(names)
    _print_summary(bench.summary())
    if not bench.results.empty:
        _print_paths(report.export_report(bench.results, args.out))
    return _finish(bench, failed)


def _sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        knobs = dict(sweep.parse_knob(spec) for spec in args.knob)
    except CkptbenchError as err:
        parser.error(str(err))
    print(f"{len(sweep.grid(knobs))} configurations of {', '.join(knobs)}")
    bench = _session(args, parser, results_file=sweep.RESULTS_FILE)
    summary, failed = sweep.run(bench, knobs)
    _print_summary(summary)
    best = sweep.best(summary)
    print(f"best (lowest median save + cold load): {best}")
    _print_paths(plot.export(sweep.figure(bench, knobs), args.out, stem=sweep.FIGURE_STEM))
    summary.to_csv(args.out / sweep.SUMMARY_FILE, index_label="strategy")
    _print_paths([args.out / sweep.SUMMARY_FILE])
    return _finish(bench, failed)


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    names = _strategies(args.strategies, parser)
    started = time.perf_counter()
    bench = _session(args, parser, results_file=BENCH_FILE)
    failed = bench.run_each(names)
    end = limits.probe(bench.out, bench.limits.probe_bytes)
    wall = time.perf_counter() - started
    _print_summary(bench.summary())
    table = targets.ratios(bench.results, wall, bench.prepare_s, bench.limits, end)
    print(table.to_string(index=False))
    record = {**bench.environment(), "limits_end": asdict(end), "wall_s": wall}
    bench.store.write_environment(bench.run_id, record)
    return _finish(bench, failed)


def _print_paths(paths: list[Path]) -> None:
    for path in paths:
        print(f"wrote {path}")


def _plot(args: argparse.Namespace) -> int:
    run = report.select_run(report.read_results(args.results), args.run_id)
    print(f"run {run['run_id'].iloc[0]} ({run['preset'].iloc[0]}): {report.missing_note(run)}")
    _print_paths(report.export_report(run, args.results.parent if args.out is None else args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        _list()
        return 0
    try:
        commands = {
            "plot": lambda: _plot(args),
            "run": lambda: _run(args, parser),
            "sweep": lambda: _sweep(args, parser),
            "bench": lambda: _bench(args, parser),
        }
        return commands[args.command]()
    except CkptbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no partial checkpoint was kept; rows already measured are in the results", file=sys.stderr)
        return 130
