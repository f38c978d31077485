"""``python -m ckptbench``: run, sweep or bench headless, verify a checkpoint, redraw or compare runs, list or document.

Exit codes: 0 success; 1 a failed or unverified strategy, a damaged checkpoint, two runs that contradict
each other, or the environment (disk, files); 2 input the user can correct (arguments, a path that is not
a checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import psutil

from . import (
    checkpoint,
    cloud,
    compare,
    disk,
    docs,
    launch,
    model,
    multihost,
    plot,
    profiles,
    ranked,
    report,
    s3server,
    scaling,
    sweep,
    targets,
    throttle,
    training,
    yourdisk,
)
from .benchmark import Benchmark, PhaseResult
from .config import LOAD_INTO, ORDERS, RunConfig
from .errors import CheckpointError, CkptbenchError, UsageError
from .manifest import MANIFEST
from .results import ResultsFile, frame, read_results, summarize
from .storage import FILE, location, remote_kinds
from .strategies import STRATEGIES
from .study import BENCH, GROUPS, parse_strategies

DEFAULT_OUT = Path("saved_models")
BENCH_FILE = "bench.csv"
WIDTH = 100
"""What ``list`` fits by default: a terminal of this many columns."""
INTERRUPTED = (
    "interrupted: an unfinished checkpoint is left only under a .partial- name, which the next run removes; "
    "rows already measured are in the results"
)


def _session_options() -> argparse.ArgumentParser:
    """Options shared by every command that measures: the model, the repeats, the output folder."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--preset", default=model.DEFAULT_PRESET, choices=list(model.PRESETS))
    options.add_argument("--model-path", type=Path, help="local Hugging Face Llama directory (config + safetensors)")
    options.add_argument("--repeats", type=int, default=1)
    options.add_argument(
        "--order", default="interleaved", choices=ORDERS, help="how repeats are ordered across strategies"
    )
    options.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results, figures and summaries go here")
    options.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up")
    options.add_argument("--no-drift", dest="drift", action="store_false", help="skip the drift probe per repeat")
    options.add_argument(
        "--reprobe", action="store_true", help="measure the disk's limits again, not today's cached ones"
    )
    options.add_argument("--seed", type=int, default=0)
    options.add_argument(
        "--disk-profile",
        default=profiles.NONE,
        choices=list(profiles.PROFILES),
        help="emulate a cloud volume's caps on the disk under --out with the kernel's I/O throttle (root)",
    )
    options.add_argument(
        "--disk-limit",
        metavar="CAPS",
        help="your own caps instead, e.g. read=300M,write=300M,riops=3000,wiops=3000 (M = 10^6 B/s, Mi = 2^20)",
    )
    options.add_argument(
        "--load-into", default="fresh", choices=LOAD_INTO, help="load into new tensors or a live model's (existing)"
    )
    options.add_argument(
        "--payload",
        default="weights",
        choices=training.PAYLOADS,
        help="the model's weights, or a training job's state (fp32 master, AdamW moments from real steps; "
        "each load resumed one step and compared); `list` says which presets' training state fits",
    )
    _store_options(options)
    return options


def _store_options(parser: argparse.ArgumentParser, store: bool = True) -> None:
    if store:
        parser.add_argument(
            "--store", default=FILE, help="where checkpoints go: 'file' (--out) or s3://BUCKET/PREFIX (AWS_* keys)"
        )
    parser.add_argument("--s3-endpoint", help="the S3 server, e.g. http://127.0.0.1:8333 (default: AWS)")
    parser.add_argument(
        "--s3-rtt-ms", type=float, help="inject this round-trip time in front of --s3-endpoint (a delay proxy)"
    )


PROCESSES = ("fresh", "same")
"""Where ``run`` and ``bench`` measure each round. ``same`` by default: on 2026-12-02 an A/A pair with a fresh
process per round agreed no better than one in a single process (docs/reference/between-run-variance.md)."""


def _process_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--process",
        choices=PROCESSES,
        default="same",
        help="fresh: each round in a new worker process sharing the model; same: every round in this one",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ckptbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    session = _session_options()
    groups = ", ".join(f"'{g}'" for g in GROUPS)
    run = commands.add_parser("run", parents=[session], help="save and load the model each way, timed and verified")
    run.add_argument("--strategies", default="all", help=f"{groups} or a comma list of: {', '.join(STRATEGIES)}")
    run.add_argument("--keep-checkpoints", action="store_true", help="keep each strategy's last checkpoint on disk")
    _process_option(run)
    run.add_argument(
        "--ranks",
        type=_rank_counts,
        metavar="N",
        help="save with N processes, each holding its rows of every tensor (gloo); ts+ocdbt then runs both ways, "
        "one database and one per process (ts+ocdbt+per-process); `list --ranks` says what each strategy does; "
        "N,N,... runs each count in turn into one results file (time against ranks)",
    )
    run.add_argument("--load-ranks", type=int, metavar="M", help="load with M processes (default N; else a reshard)")
    run.add_argument(
        "--rank-timeout",
        type=float,
        default=RunConfig.rank_timeout_s,
        metavar="S",
        help="fail a run whose ranks wait longer than S seconds for each other",
    )
    sweep_cmd = commands.add_parser("sweep", parents=[session], help="the TensorStore writer over a grid of knobs")
    sweep_cmd.add_argument(
        "--knob",
        action="append",
        required=True,
        metavar="NAME=V1,V2",
        help=f"repeatable; NAME: {', '.join(sweep.KNOBS)}",
    )
    sweep_cmd.add_argument(
        "--base", help="the registered TensorStore strategy whose knobs are varied (default: the study's baseline)"
    )
    sweep_cmd.add_argument("--peers", help="strategies measured in the same rounds, e.g. safetensors,runai-streamer")
    bench_cmd = commands.add_parser("bench", parents=[session], help="ts+best against its peers and the disk")
    bench_cmd.add_argument("--strategies", default=",".join(BENCH), help="comma list of strategies")
    _process_option(bench_cmd)
    verify_cmd = commands.add_parser("verify", help="check checkpoints against their manifests, tensor by tensor")
    verify_cmd.add_argument(
        "paths", nargs="+", metavar="PATH", help="checkpoint folders, or s3://BUCKET/PREFIX with --s3-endpoint"
    )
    verify_cmd.add_argument("--strategy", help="read it as this strategy (default: the one its manifest names)")
    _store_options(verify_cmd, store=False)
    plot_cmd = commands.add_parser("plot", help="draw one run's comparison figure and summary from a results CSV")
    plot_cmd.add_argument("--results", type=Path, default=DEFAULT_OUT / "results.csv")
    plot_cmd.add_argument("--out", type=Path, help="where the figure and summary.csv go (default: the CSV's folder)")
    plot_cmd.add_argument("--run-id", help="the run to draw (default: the latest in the file)")
    plot_cmd.add_argument(
        "--by",
        choices=("strategy", "ranks"),
        default="strategy",
        help="ranks: time against the number of ranks, from every run with --ranks of the latest model",
    )
    compare_cmd = commands.add_parser(
        "compare",
        help="two runs side by side: medians with intervals, and whether claims, targets and answers agree",
        description="Exit 0 when the runs agree, 1 when a verdict contradicts the other run's (named).",
    )
    compare_cmd.add_argument(
        "runs", nargs="+", metavar="RUN", help="two results files (the latest run of each), or one file and two run ids"
    )
    compare_cmd.add_argument("--figure", type=Path, metavar="DIR", help="also draw the calibration figure into DIR")
    list_cmd = commands.add_parser("list", help="the strategies and their knobs")
    list_cmd.add_argument("--markdown", action="store_true", help="as the Markdown table the docs embed")
    list_cmd.add_argument("--wide", action="store_true", help="every knob as a column (wider than a terminal)")
    list_cmd.add_argument("--ranks", action="store_true", help="what each strategy does with ranks (run --ranks)")
    docs_cmd = commands.add_parser("docs", help="regenerate the tables in the docs from the registry and results")
    docs_cmd.add_argument("--check", action="store_true", help="exit 1 if any generated block is out of date")
    server_cmd = commands.add_parser("s3-server", help="run a local S3 server (SeaweedFS) until Ctrl-C")
    server_cmd.add_argument("--dir", type=Path, help="its data folder (default: a temporary one, removed on stop)")
    server_cmd.add_argument("--port", type=int, default=s3server.DEFAULT_PORT, help="its S3 port")
    server_cmd.add_argument("--host", default="127.0.0.1", help="the address it binds every port to")
    server_cmd.add_argument(
        "--volumes", type=int, metavar="N", help="a cluster: a master, N volume servers, a filer and S3, each a process"
    )
    server_cmd.add_argument("--bucket", default=s3server.DEFAULT_BUCKET, help="the bucket it creates")
    hosts_cmd = commands.add_parser(
        "hosts",
        help="rehearse a 2-host run on this machine (root): network namespaces, torchrun per host, an S3 cluster",
    )
    hosts_cmd.add_argument("--nproc-per-node", type=int, default=2, metavar="P", help="ranks per host")
    hosts_cmd.add_argument("--volumes", type=int, default=2, metavar="V", help="volume servers of the S3 cluster")
    hosts_cmd.add_argument(
        "run", nargs=argparse.REMAINDER, help="the arguments of `run` after --, e.g. -- --preset tiny --load-ranks 3"
    )
    return parser


def _config(args: argparse.Namespace, **extra) -> RunConfig:
    return RunConfig(
        preset=args.preset,
        model_path=args.model_path,
        out=args.out,
        repeats=args.repeats,
        order=args.order,
        warmup=args.warmup,
        drift=args.drift,
        reprobe=args.reprobe,
        seed=args.seed,
        store=args.store,
        s3_endpoint=args.s3_endpoint,
        s3_rtt_ms=args.s3_rtt_ms,
        load_into=args.load_into,
        payload=args.payload,
        disk_profile=args.disk_profile,
        disk_limit=args.disk_limit,
        **extra,
    )


def _session(config: RunConfig) -> Benchmark:
    bench = Benchmark(config)
    checkpoint = bench.prepare()
    print(
        f"{checkpoint.source}: {len(checkpoint.tensors)} tensors, {checkpoint.params:,} parameters, "
        f"{checkpoint.nbytes / 1e9:.3g} GB; {bench.storage.measured_on}: {bench.limits.describe()}; "
        f"{config.repeats} repeat(s), {config.order} order"
        f"{', each round in a fresh process' if config.fresh_process else ''}, loads into {config.load_into} tensors"
    )
    return bench


def _finish(bench: Benchmark, phases: list[PhaseResult]) -> int:
    if cloud.is_cloud(bench.results):
        print(f"on {bench.storage.url}; times MODELLED at a real round trip = measured + requests x RTT / concurrency:")
        _show(cloud.table(bench.results), "no strategy completed: nothing to model")
    if bench.limits is not None and bench.limits.throttle:
        for _, row in yourdisk.over_caps(bench.results).iterrows():
            print(
                f"warning: {row['strategy']} [{row['repeat'] + 1:.0f}] wrote at {row['write_bps'] / 1e6:,.0f} MB/s and "
                f"read at {row['read_bps'] / 1e6:,.0f} MB/s, faster than {yourdisk.ALLOWANCE} x the caps: "
                "its I/O escaped the throttle",
                file=sys.stderr,
            )
        print(yourdisk.check(bench.results))
    print(f"results: {bench.results_file.csv}\nenvironment: {bench.results_file.environment_path(bench.run_id)}")
    failed = [p for p in phases if not p.ok]
    for phase in failed:
        print(f"error: {phase.strategy}: {phase.error}", file=sys.stderr)
    return 1 if failed else 0


def _show(table: pd.DataFrame, empty: str = "no rows: every strategy failed (the errors follow)", index=True) -> None:
    """A table as text; an empty one as a sentence saying why, never pandas' "Empty DataFrame"."""
    print(empty if table.empty else table.to_string(index=index))


def _print_paths(paths: list[Path]) -> None:
    for path in paths:
        print(f"wrote {path}")


def _run(args: argparse.Namespace) -> int:
    if args.ranks is not None or args.load_ranks is not None or launch.under_torchrun():
        return _run_ranked(args)
    names = parse_strategies(args.strategies)
    bench = _session(_config(args, keep_checkpoints=args.keep_checkpoints, fresh_process=args.process == "fresh"))
    phases = bench.run(names)
    _show(report.summary_table(bench.summary()))
    _print_paths(report.export_report(bench.results, args.out))
    if cloud.is_cloud(bench.results):
        verdicts = cloud.verdicts(bench.results)[["claim", "measured", "verdict"]]
        _show(verdicts, "no verdicts: nothing completed", index=False)
    return _finish(bench, phases)


def _rank_counts(text: str) -> list[int]:
    """``N`` or ``N,N,...``: several counts run one after another, so one command (one queued job) draws the
    curve of time against ranks."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of ranks (at least 1), or several separated by commas")
    return counts


def _run_ranked(args: argparse.Namespace) -> int:
    """``run --ranks``: spawned here, or one rank of torchrun's world (whose size is then the default N);
    several counts one after another (spawned only), the worst exit code kept."""
    counts = args.ranks or [launch.torchrun_size() if launch.under_torchrun() else None]
    if len(counts) > 1 and launch.under_torchrun():
        raise UsageError("torchrun starts one world: give --ranks one count (or none) under torchrun")
    return max(_run_ranks(args, ranks) for ranks in counts)


def _run_ranks(args: argparse.Namespace, ranks: int | None) -> int:
    config = _config(
        args,
        keep_checkpoints=args.keep_checkpoints,
        ranks=ranks,
        load_ranks=args.load_ranks,
        rank_timeout_s=args.rank_timeout,
        progress=False,
        fresh_process=args.process == "fresh",
    )
    outcome = ranked.run(config, args.strategies)
    if outcome is None:
        return 0
    results = frame(row for phase in outcome.phases for row in phase.rows)
    _show(report.summary_table(summarize(results)))
    _print_paths(report.export_report(results, args.out))
    store = ResultsFile(config.out, config.results_file)
    _print_paths(plot.export(scaling.figure(store.read()), args.out, stem=scaling.STEM))
    print(f"results: {store.csv}\nenvironment: {store.environment_path(outcome.run_id)}")
    failed = [p for p in outcome.phases if not p.ok]
    for phase in failed:
        print(f"error: {phase.strategy}: {phase.error}", file=sys.stderr)
    return 1 if failed else 0


def _sweep(args: argparse.Namespace) -> int:
    knobs = sweep.parse_knobs(args.knob)
    base = None if args.base is None else sweep.base_strategy(args.base)
    peers = [] if args.peers is None else parse_strategies(args.peers)
    configurations = [s.name for s in sweep.grid(knobs, base)]
    print(f"{len(configurations)} configurations of {', '.join(knobs)}")
    bench = _session(_config(args, results_file=sweep.RESULTS_FILE))
    summary, phases = sweep.run(bench, knobs, base, peers)
    _show(report.summary_table(summary))
    print(f"best (lowest median save + cold load): {sweep.best(summary.loc[summary.index.isin(configurations)])}")
    swept = bench.results[bench.results["strategy"].isin(configurations)]
    _print_paths(plot.export(sweep.figure(swept, list(knobs)), args.out, stem=sweep.FIGURE_STEM))
    summary.to_csv(args.out / sweep.SUMMARY_FILE, index_label="strategy")
    _print_paths([args.out / sweep.SUMMARY_FILE])
    return _finish(bench, phases)


def _bench(args: argparse.Namespace) -> int:
    names = parse_strategies(args.strategies)
    bench = _session(_config(args, results_file=BENCH_FILE, fresh_process=args.process == "fresh"))
    outcome = targets.bench(bench, names)
    _show(report.summary_table(summarize(outcome.results)))
    _show(report.targets_table(outcome.targets), "no targets: nothing completed", index=False)
    return _finish(bench, outcome.phases)


def _verify(args: argparse.Namespace) -> int:
    """Every path in turn; the exit code is the worst: 2 when one is not a checkpoint, 1 when one is damaged."""
    code = 0
    for path in args.paths:
        try:
            found = checkpoint.verify(location(path, args.s3_endpoint, args.s3_rtt_ms), args.strategy)
        except CheckpointError as err:
            print(f"error: not a checkpoint ckptbench can verify: {err}", file=sys.stderr)
            code = 2
            continue
        for damage in found.damage:
            print(f"{found.path}: DAMAGED {damage.tensor}: {' '.join(damage.problem.split())}")
        tensors = sum(d.tensor != MANIFEST for d in found.damage)
        manifest = "its manifest" if len(found.damage) > tensors else ""
        state = " and ".join(filter(None, [manifest, f"{tensors} of {found.tensors} tensors" if tensors else ""]))
        state = "intact" if found.intact else f"DAMAGED: {state}"
        old = "" if found.sealed else " (a manifest without its own digest: written before ckptbench sealed them)"
        print(f"{found.path}: {found.strategy} checkpoint, {found.tensors} tensors, {state}{old}")
        code = max(code, 0 if found.intact else 1)
    return code


def _plot(args: argparse.Namespace) -> int:
    if args.by == "ranks":
        try:
            figure = scaling.figure(read_results(args.results))
        except ValueError as err:
            raise CkptbenchError(f"{args.results}: {err}") from err
        _print_paths(plot.export(figure, args.results.parent if args.out is None else args.out, stem=scaling.STEM))
        return 0
    run = report.select_run(read_results(args.results), args.run_id)
    print(f"run {run['run_id'].iloc[0]} ({run['preset'].iloc[0]}): {report.missing_note(run)}")
    out = args.results.parent if args.out is None else args.out
    disk.check_folder(out)
    _print_paths(report.export_report(run, out))
    return 0


def _runs_to_compare(given: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, str]]:
    """The two runs' rows and their labels: ``FILE RUN RUN``, or ``FILE FILE`` (each file's latest run)."""
    if len(given) == 3:
        results = read_results(given[0])
        return report.select_run(results, given[1]), report.select_run(results, given[2]), (given[1], given[2])
    if len(given) == 2 and all(Path(p).is_file() for p in given):
        a, b = (report.select_run(read_results(p)) for p in given)
        return a, b, (f"{given[0]} ({a['run_id'].iloc[0]})", f"{given[1]} ({b['run_id'].iloc[0]})")
    missing = [p for p in given if not Path(p).is_file()][:1]
    where = f" ({missing[0]} is not a file)" if missing and len(given) == 2 else ""
    raise UsageError(f"compare takes two results files, or one file and two run ids{where}")


def _compare(args: argparse.Namespace) -> int:
    a, b, names = _runs_to_compare(args.runs)
    result = compare.compare(a, b, names)
    for title, table in (
        ("Medians across rounds", compare.medians_table(result)),
        ("Claims", result.claims),
        ("Targets", result.targets.drop(columns=["A covers B", "B covers A"])),
        ("What should I use?", result.answers),
    ):
        print(f"\n{title}:\n{table.to_string(index=False) if len(table) else '(none in both runs)'}")
    print(f"\n{result.summary()}")
    if args.figure is not None:
        disk.check_folder(args.figure)
        _print_paths(plot.export(compare.figure(result), args.figure, stem=compare.FIGURE_STEM))
    return 0 if result.agree else 1


def _list(args: argparse.Namespace) -> int:
    """Fits ``WIDTH`` columns: the strategies' formats (``--wide``/``--markdown``: every knob), or their forms
    with ranks, each described in wrapped lines."""
    if args.ranks:
        if args.markdown:
            print(docs.forms_markdown().rstrip("\n"))
            return 0
        forms = docs.forms_table()["with ranks"]
        indent = " " * (max(map(len, forms.index)) + 2)
        for name, how in forms.items():
            print(textwrap.fill(how, WIDTH, initial_indent=f"{name:<{len(indent)}}", subsequent_indent=indent))
        return 0
    if args.markdown:
        print(docs.strategies_markdown().rstrip("\n"))
        return 0
    table = docs.strategies_table()
    kinds = remote_kinds()
    if args.wide:
        for kind in kinds:
            table[f"on {kind}"] = [
                f"skipped: {why}" if (why := STRATEGIES[n].unsupported(kind)) else "ok" for n in table.index
            ]
        print(table.to_string())
        return 0
    rows = [("name", "8-way", "format", *(f"on {kind}" for kind in kinds))]
    rows += [
        (
            name,
            table.loc[name, "8-way"],
            table.loc[name, "format"],
            *("no" if STRATEGIES[name].unsupported(kind) else "yes" for kind in kinds),
        )
        for name in table.index
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, [*widths, 0], strict=True)).rstrip())
    print(f"every knob, and why a strategy cannot run on {' or '.join(kinds)}: `list --wide` or `list --markdown`")
    print(f"\npresets (--payload training: the state with a loaded copy and a step, in {training.memory_text()}):")
    print(training.presets_table().to_string())
    return 0


def _exit_interrupted(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM during a measurement: end now, as a kill would, without waiting for queued writes.

    Whatever was being written stays under its ``.partial-``/working name with this process's pid,
    which the next run removes; rows are appended whole, so none is lost. Spawned ranks are ended too.
    """
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.terminate()
    print(INTERRUPTED, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _s3_server(args: argparse.Namespace) -> int:
    s3server.serve(args.bucket, args.dir, args.port, host=args.host, volumes=args.volumes)
    return 0


def _hosts(args: argparse.Namespace) -> int:
    multihost.rehearse([a for a in args.run if a != "--"], per_host=args.nproc_per_node, volumes=args.volumes)
    return 0


def _docs(args: argparse.Namespace) -> int:
    stale = docs.regenerate(check=args.check)
    for path in stale:
        print(f"{'out of date' if args.check else 'regenerated'}: {path}")
    return 1 if args.check and stale else 0


@contextlib.contextmanager
def _restored(handlers: dict) -> Iterator[None]:
    """Put signal handlers back (``main`` may run inside another program: a test, a notebook)."""
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings (a results file kept aside, damaged rows skipped) as one line each, not a source listing."""
    shown = warnings.showwarning
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
    try:
        yield
    finally:
        warnings.showwarning = shown


COMMANDS = {
    "run": _run,
    "sweep": _sweep,
    "bench": _bench,
    "verify": _verify,
    "plot": _plot,
    "compare": _compare,
    "list": _list,
    "docs": _docs,
    "s3-server": _s3_server,
    "hosts": _hosts,
}


MEASURING = ("run", "sweep", "bench")
"""The commands that write checkpoints: an interrupt ends them at once (``_exit_interrupted``)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    ending = (signal.SIGINT, signal.SIGTERM) if args.command in MEASURING and not launch.under_torchrun() else ()
    previous = {sig: signal.signal(sig, _exit_interrupted) for sig in ending}
    with _one_line_warnings(), _restored(previous):
        try:
            return COMMANDS[args.command](args)
        except UsageError as err:
            parser.error(str(err))
        except CkptbenchError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        except OSError as err:  # the environment failed where no step expected it (a disk that filled up)
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            return 130
        finally:
            throttle.leave()
