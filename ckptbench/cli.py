"""``python -m ckptbench``: run the benchmark headless, redraw a run's figure, or list the strategies."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from . import model, report
from .benchmark import Benchmark
from .errors import CkptbenchError, UnknownChoiceError, VerificationError
from .strategies import EIGHT_WAY, STRATEGIES, parse_strategies

DEFAULT_OUT = Path("saved_models")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ckptbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="save and load the model with each strategy, timed and verified")
    run.add_argument("--preset", default=model.DEFAULT_PRESET, choices=list(model.PRESETS))
    run.add_argument("--model-path", type=Path, help="local Hugging Face Llama directory (config + safetensors)")
    run.add_argument(
        "--strategies",
        default="all",
        help=f"'all' (the eight) or a comma list of: {', '.join(STRATEGIES)}",
    )
    run.add_argument("--repeats", type=int, default=1)
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results, figure and summary go here")
    run.add_argument("--keep-checkpoints", action="store_true", help="keep each strategy's last checkpoint on disk")
    run.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up per strategy")
    run.add_argument("--seed", type=int, default=0)
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


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        names = parse_strategies(args.strategies)
    except UnknownChoiceError as err:
        parser.error(str(err))
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    bench = Benchmark(
        preset=args.preset,
        model_path=args.model_path,
        out=args.out,
        repeats=args.repeats,
        keep_checkpoints=args.keep_checkpoints,
        warmup=args.warmup,
        seed=args.seed,
    )
    checkpoint = bench.prepare()
    print(
        f"{checkpoint.source}: {len(checkpoint.tensors)} tensors, {checkpoint.params:,} parameters, "
        f"{checkpoint.nbytes / 1e9:.2f} GB; disk: {bench.limits.write_gbps:.2f} GB/s durable write, "
        f"{bench.limits.read_gbps:.2f} GB/s cold read"
    )
    failed = []
    for name in names:
        try:
            bench.run_phase(name)
        except VerificationError as err:
            failed.append(name)
            print(f"error: {err}", file=sys.stderr)
    summary = bench.summary()
    shown = summary[list(report.SUMMARY_COLUMNS)].rename(columns=report.SUMMARY_COLUMNS)
    print(shown.to_string(float_format="{:.3f}".format))
    print(f"results: {bench.store.csv}\nenvironment: {bench.store.environment_path(bench.run_id)}")
    if not bench.results.empty:
        _print_paths(report.export_report(bench.results, args.out))
    if failed:
        print(f"error: not verified: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


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
        return _plot(args) if args.command == "plot" else _run(args, parser)
    except CkptbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no partial checkpoint was kept; rows already measured are in the results", file=sys.stderr)
        return 130
