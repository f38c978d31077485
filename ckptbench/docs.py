"""Generated blocks in the Markdown docs: every table there comes from the registry or a committed data file.

A block is delimited by ``<!-- ckptbench:KIND ARGS -->`` and ``<!-- /ckptbench -->``; ``python -m
ckptbench docs`` rewrites what lies between them and ``--check`` (run by the tests) fails when a
block no longer matches its source, so no number in the docs is typed by hand.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from . import betweenrun, choices, cloud, compare, levers, report, scaling, study, targets, verdict, yourdisk
from .errors import CkptbenchError
from .formatting import sig
from .limits import MISS
from .profiles import PROFILES, Caps
from .results import read_results, succeeded, summarize
from .strategies import STRATEGIES
from .study import EIGHT_WAY, GROUPS, ordered

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = (
    "README.md",
    "8WAY_COMPARISON_GUIDE.md",
    "docs/results/README.md",
    "docs/reference/ranks.md",
    "docs/reference/object-storage.md",
    "docs/reference/between-run-variance.md",
    "docs/reference/fast-loads.md",
)
_BLOCK = re.compile(r"(<!-- ckptbench:(?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /ckptbench -->)", re.DOTALL)


def strategies_table(group: str = "every") -> pd.DataFrame:
    names = GROUPS[group]
    table = pd.DataFrame.from_dict({n: STRATEGIES[n].knobs() for n in names}, orient="index").fillna("")
    table.insert(0, "8-way", ["yes" if n in EIGHT_WAY else "" for n in table.index])
    return table.rename_axis("name")


def markdown(table: pd.DataFrame, index: bool = True) -> str:
    """A pipe table without extra dependencies; cells' pipes escaped."""
    frame = table.reset_index() if index else table
    cells = [[str(v).replace("|", "\\|") for v in row] for row in frame.astype(str).itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def strategies_markdown(group: str = "every") -> str:
    table = strategies_table(group)
    table.index = [f"`{n}`" for n in table.index]
    return markdown(table.rename_axis("name"))


def forms_table() -> pd.DataFrame:
    """Every strategy's forms with ranks (``run --ranks``): what each rank writes and reads."""
    forms = study.forms("every")
    return pd.DataFrame({"with ranks": [f.how for f in forms]}, index=[f.name for f in forms]).rename_axis("name")


def forms_markdown() -> str:
    table = forms_table()
    table.index = [f"`{n}`" for n in table.index]
    return markdown(table.rename_axis("name"))


def _ranks(path: str) -> str:
    """Median save and cold load per strategy and plan, from every run with ranks in a results file."""
    table = scaling.table(read_results(ROOT / path))
    table.index = [f"`{n}`" for n in table.index]
    return markdown(table.rename_axis("strategy"))


def _ranks_intervals(path: str) -> str:
    """Save and cold load per strategy and plan with intervals over rounds, and the fastest plan or the tie."""
    table = scaling.intervals(read_results(ROOT / path))
    table.index = [f"`{n}`" for n in table.index]
    return markdown(table.rename_axis("strategy"))


def _rank_requests(path: str) -> str:
    """Each rank's requests and object bytes per strategy and plan, from a results file's runs on an object store."""
    table = scaling.requests(read_results(ROOT / path))
    return markdown(table.assign(strategy=[f"`{n}`" for n in table["strategy"]]), index=False)


def _results(path: str) -> pd.DataFrame:
    results = read_results(ROOT / path)
    return results[results["run_id"] == results["run_id"].iloc[-1]]


def _summary(path: str) -> str:
    results = _results(path)
    table = report.summary_table(summarize(results, order=ordered(results["strategy"])))
    table.index = [f"`{n}`" for n in table.index]
    return markdown(table.rename_axis("strategy"))


def _untimed(path: str) -> str:
    """Where a run's wall time went: per strategy, the timed regions and each untimed part, summed over repeats."""
    results = _results(path)
    table = report.time_spent(results)
    table.index = [f"`{n}`" for n in table.index]
    return markdown(table.rename_axis("strategy"))


def _choices(path: str, strategies: str = "") -> str:
    """The answers from a run's rows; with ``strategies`` (a comma list), from those strategies' rows only."""
    results = _results(path)
    if strategies:
        results = results[results["strategy"].isin(strategies.split(","))]
    return markdown(choices.table(results), index=False)


def _intervals(path: str) -> str:
    """Every strategy's answer to each "What should I use?" question, median [interval] over rounds; the best
    and those tied with it marked, so a lever that does not help shows as a tie or a loss, not only by omission."""
    columns: dict[str, dict[str, str]] = {}
    for found in choices.answers(_results(path)):
        tied = found.names
        for candidate in found.ranked:
            mark = "" if not tied & set(candidate.names) else (", best" if candidate is found.ranked[0] else ", tie")
            for name in candidate.names:
                columns.setdefault(found.question.text, {})[name] = f"{candidate.span}{mark}"
    table = pd.DataFrame(columns).fillna("")
    table.index = [f"`{n}`" for n in table.index]
    return markdown(table.rename_axis("strategy"))


def _levers(path: str, base: str, column: str, peers: str = "", run_id: str = "") -> str:
    """A sweep's every configuration and peer: ``column``'s median [interval] and its ratios, paired in rounds,
    to ``base`` (faster, slower or a tie) and to the fastest of ``peers``, with the region's page faults; from
    the file's last run, or ``run_id``'s."""
    rows = report.select_run(read_results(ROOT / path), run_id or None)
    table = levers.table(rows, base, column, [p for p in peers.split(",") if p])
    table.index = [f"`{n}`" for n in table.index]
    return markdown(table.rename_axis("strategy"))


def _explained(path: str, keys: str) -> str:
    """For each run in a results file, each target of ``keys`` (comma list): met, or the measured bound of a miss."""
    results = read_results(ROOT / path)
    tables = []
    for run_id in results["run_id"].drop_duplicates():
        cores = json.loads((ROOT / path).parent.joinpath("runs", f"{run_id}.json").read_text())["cores"]
        rows = report.select_run(results, run_id)
        tables.append(targets.explained(rows, cores, keys.split(",")).assign(run=run_id))
    table = pd.concat(tables)
    return markdown(table[["run", "target", "measured", "verdict", "bound"]], index=False)


def _payloads(training: str, *weights: str) -> str:
    """Training runs' sizes against the weights-only runs' (each strategy from the first listed file measuring it;
    ``training`` is a comma list), and each strategy's peak memory in a save or load beyond the state and one copy
    of it, the most over its repeats in that training run."""
    sizes = {
        Path(path).parent.name: succeeded(_results(path)).groupby("strategy")["bytes"].median() for path in weights
    }
    table: dict[str, dict[str, str]] = {}
    for path in training.split(","):
        for name, own in succeeded(_results(path)).groupby("strategy", sort=False):
            table.setdefault(f"`{name}`", _payload(own, Path(path).parent.name, name, sizes))
    return markdown(pd.DataFrame.from_dict(table, orient="index").rename_axis("strategy"))


def _payload(own: pd.DataFrame, run: str, name: str, sizes: dict[str, pd.Series]) -> dict[str, str]:
    weights_run, weighed = next(((w, size[name]) for w, size in sizes.items() if name in size.index), ("", None))
    state = own["bytes"].median()
    return {
        "training GB": sig(state / 1e9),
        "weights GB": "" if weighed is None else sig(weighed / 1e9),
        "ratio": "" if weighed is None else sig(state / weighed),
        "training run": run,
        "weights run": weights_run,
        "peak above state + copy GB": sig(
            (own[["peak_rss_save", "peak_rss_load"]].max(axis=1) - own["model_bytes"]).max() / 1e9
        ),
    }


def _verdicts(path: str) -> str:
    table = verdict.check(_results(path))
    return markdown(table[["claim", "measured", "verdict", "reason"]], index=False)


def _targets(path: str, keys: str = "", run: str = "") -> str:
    """A committed targets file as the bench prints it; ``keys`` (comma list) keeps only those rows, ``run`` one
    run's of a file that holds several (an A/A pair's)."""
    table = pd.read_csv(ROOT / path)
    runs = table["run_id"].astype(str).unique() if "run_id" in table else []
    if len(runs) > 1 and run not in runs:
        raise ValueError(f"{path} holds the targets of runs {', '.join(runs)}: name one")
    if run:
        table = table[table["run_id"].astype(str) == run]
    if keys:
        table = table[table["key"].isin(keys.split(","))]
    table["met"] = table["met"].map({True: True, False: False, "True": True, "False": False})
    return markdown(report.targets_table(table), index=False)


def _environment(path: str) -> str:
    env = json.loads((ROOT / path).read_text())
    limits = env.get("limits") or env.get("disk_limits") or {}
    items = {
        "run": env["run_id"],
        "model": f"{env['preset']}: {env['tensors']} tensors, {env['model_bytes'] / 1e9:.3g} GB",
        "repeats": f"{env.get('repeats')} ({env.get('order', 'sequential')} order)",
        "machine": f"{env['cores']} cores, {env['ram_bytes'] / 2**30:.0f} GiB, {env['filesystem']}",
        "disk": f"{limits.get('write_gbps', float('nan')):.3g} GB/s durable write, "
        f"{limits.get('read_gbps', float('nan')):.3g} GB/s cold read",
        "versions": ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v),
        "commit": env.get("git_commit") or "",
    }
    return markdown(pd.DataFrame({"value": items}).rename_axis("item"))


def _csv(path: str, columns: str = "") -> str:
    """A committed CSV as it is (e.g. a sweep's summary), selected columns, numbers to three digits."""
    table = pd.read_csv(ROOT / path)
    if columns:
        table = table[columns.split(",")]
    shown = table.apply(lambda c: c.map(sig) if pd.api.types.is_float_dtype(c) else c)
    return markdown(shown, index=False)


def _cloud(path: str, rtt_ms: str = str(cloud.RTT_MS), concurrency: str = str(cloud.CONCURRENCY)) -> str:
    table = cloud.table(_results(path), float(rtt_ms), int(concurrency))
    table.index = [f"`{n}`" for n in table.index]
    return markdown(table.rename_axis("strategy"))


def _compare(path: str, run_a: str, run_b: str) -> str:
    """Two runs of one results file side by side: the medians with intervals, then calibration and agreement."""
    results = read_results(ROOT / path)
    result = compare.compare(report.select_run(results, run_a), report.select_run(results, run_b))
    lines = [f"{line}  " for line in result.summary().splitlines()]
    targets = (
        markdown(result.targets.drop(columns=["A covers B", "B covers A"]), index=False) if len(result.targets) else ""
    )
    return "\n".join([markdown(compare.medians_table(result), index=False), targets, *lines]) + "\n"


def _spread(path: str, run_a: str, run_b: str, path_b: str = "") -> str:
    """How far two runs of one command moved apart, in a few lines: the medians' B / A and the calibration.
    With ``path_b``, run B is read from that file (runs of two A/A pairs compared across them)."""
    results = read_results(ROOT / path)
    other = read_results(ROOT / path_b) if path_b else results
    result = compare.compare(report.select_run(results, run_a), report.select_run(other, run_b))
    moved = result.medians["B / A"]
    lines = [
        f"the same strategy and timing moved by B / A = {sig(moved.min())} to {sig(moved.max())} "
        f"(median {sig(moved.median())}) over {len(moved)} medians",
        *result.summary().splitlines()[1:],
    ]
    return markdown(pd.DataFrame({"between the two runs": [line.strip() for line in lines]}), index=False)


def _between(preset: str) -> str:
    """A preset's between-run spread per family, as computed from its declared A/A pairs, and the pairs."""
    spreads = betweenrun.spreads(preset)
    rows = [
        {
            "figures": f"{family}: {betweenrun.FAMILIES[family]}",
            "log(B / A) of": spread.figures,
            "root mean square": sig(spread.rms),
            "a second run within (95 %)": f"x/÷ {sig(math.exp(spread.margin))}",
        }
        for family, spread in spreads.items()
    ]
    pairs = "; ".join(f"`{p.path}` {p.a} against {p.b}" for p in betweenrun.PAIRS.get(preset, ()))
    return markdown(pd.DataFrame(rows), index=False) + f"\nA/A pairs of `{preset}`: {pairs or 'none'}\n"


def _anchor(strategy: str, *paths: str) -> str:
    """One strategy measured in several runs that differ otherwise: its median [interval] per timing in each later
    run against the first's. Runs that measured different strategies are set side by side only through it."""
    first = _results(paths[0])
    rows = []
    for path in paths[1:]:
        medians = compare.compare(first, _results(path), between=False).medians
        for row in medians[medians["strategy"] == strategy].to_dict("records"):
            rows.append(
                {
                    "run": Path(path).parent.name,
                    "timing": row["metric"],
                    Path(paths[0]).parent.name: str(row["A"]),
                    "this run": str(row["B"]),
                    "this run / first": sig(row["B / A"]),
                    "intervals": "overlap" if row["A"].overlaps(row["B"]) else "apart",
                }
            )
    return markdown(pd.DataFrame(rows), index=False)


def _machine(path: str) -> str:
    """Per run of a results file: other work, the hypervisor's steal and the disk's drift around its rows."""
    return markdown(report.machine_table(read_results(ROOT / path)))


def _tightness(*pairs: str) -> str:
    """How far each A/A pair's two runs moved apart, per timing, then each later pair against the first:
    ``LABEL=PATH:RUN_A:RUN_B[:ROUNDS]`` each, ROUNDS keeping each run's first rounds so pairs of different
    lengths compare with intervals of equal coverage (the raw disk's pair first, a profile's after it)."""
    medians = {}
    for spec in pairs:
        label, _, where = spec.partition("=")
        path, run_a, run_b, *rounds = where.split(":")
        results = read_results(ROOT / path)
        a, b = (report.select_run(results, run) for run in (run_a, run_b))
        if rounds:
            a, b = (run[run["repeat"] < int(rounds[0])] for run in (a, b))
        medians[label] = compare.compare(a, b).medians
    (first, reference), *others = medians.items()
    parts = [markdown(yourdisk.spread(medians), index=False)]
    for label, other in others:
        parts.append(f"\n{label} against {first}, strategy by strategy:\n\n")
        parts.append(markdown(yourdisk.tighter(reference, other), index=False))
    return "".join(parts)


def _rounds(path: str, loadavg: str = "") -> str:
    """Per run and round: its rows' summed timed seconds and span, and with a load-average log (lines of
    ``ISO-time load1 load5 load15 ...``, as ``/proc/loadavg`` sampled) the machine's mean 1-minute load then."""
    results = read_results(ROOT / path)
    results["time"] = pd.to_datetime(results["timestamp"], format="%Y-%m-%dT%H:%M:%S%z").dt.tz_convert(None)
    results["timed s"] = results[["save_s", "load_cold_s", "load_warm_s"]].sum(axis=1)
    table = results.groupby(["run_id", "repeat"], sort=False).agg(
        first=("time", "min"), last=("time", "max"), timed=("timed s", "sum")
    )
    if loadavg:
        log = pd.read_csv(ROOT / loadavg, sep=" ", header=None, usecols=[0, 1], names=["time", "load"])
        log["time"] = pd.to_datetime(log["time"])
        table["1-min load"] = [
            log.loc[log["time"].between(a, b), "load"].mean()
            for a, b in zip(table["first"], table["last"], strict=True)
        ]
    table["round"] = [int(r) + 1 for _, r in table.index]
    shown = table.reset_index().drop(columns="repeat")
    shown["first"] = shown["first"].dt.strftime("%H:%M:%S")
    shown["last"] = shown["last"].dt.strftime("%H:%M:%S")
    columns = ["run_id", "round", "first", "last", "timed", *(["1-min load"] if loadavg else [])]
    shown = shown[columns].rename(columns={"run_id": "run", "timed": "timed s (sum)"})
    return markdown(shown.apply(lambda c: c.map(sig) if pd.api.types.is_float_dtype(c) else c), index=False)


def _profile(path: str, run: str = "") -> str:
    """A run under a disk profile (the file's last, or ``run``): each strategy against its floors and caps."""
    table = yourdisk.table(report.select_run(read_results(ROOT / path), run) if run else _results(path))
    table.index = [f"`{n}`" for n in table.index]
    return markdown(table.rename_axis("strategy"))


def _profiles(*runs: str) -> str:
    """``LABEL=PATH ...``: each run's medians side by side, one column pair per disk."""
    table = yourdisk.across({label: _results(path) for label, path in (r.split("=", 1) for r in runs)})
    table.index = [f"`{n}`" for n in table.index]
    return markdown(table.rename_axis("strategy"))


def disk_profiles_markdown() -> str:
    """The built-in disk profiles: their caps, the volume each stands for and where its figures come from."""
    table = pd.DataFrame(
        {
            "caps": [p.caps.describe() for p in PROFILES.values()],
            "stands for": [p.volume for p in PROFILES.values()],
            "figures from": [p.source for p in PROFILES.values()],
        },
        index=[f"`{name}`" for name in PROFILES],
    )
    return markdown(table.rename_axis("--disk-profile"))


def _caps(path: str) -> str:
    """A profiled run's environment: each cap, the ceiling measured under it and the raw disk's."""
    throttle = json.loads((ROOT / path).read_text())["limits"]["throttle"]
    limits = json.loads((ROOT / path).read_text())["limits"]
    caps = Caps.parse(throttle["caps"])
    rows = {
        "write MB/s": (caps.write_bps and caps.write_bps / 1e6, limits["write_gbps"] * 1e3, throttle["raw_write_gbps"]),
        "read MB/s": (caps.read_bps and caps.read_bps / 1e6, limits["read_gbps"] * 1e3, throttle["raw_read_gbps"]),
        "write IOPS (16 KiB, O_DIRECT)": (caps.write_iops, limits.get("write_iops"), None),
        "read IOPS (16 KiB, O_DIRECT)": (caps.read_iops, limits.get("read_iops"), None),
        "small files/s (create, write, fsync)": (None, limits.get("files_per_s"), None),
    }
    table = pd.DataFrame(
        {
            "cap": [sig(c) for c, _, _ in rows.values()],
            "measured under it": [sig(m) for _, m, _ in rows.values()],
            "held (within 10 %)": [
                "" if not c or m is None else ("yes" if abs(m / c - 1) <= MISS else "NO") for c, m, _ in rows.values()
            ],
            "raw disk": [sig(r * 1e3) if r else "" for _, _, r in rows.values()],
        },
        index=list(rows),
    )
    table = table[(table["cap"] != "") | (table["measured under it"] != "")]
    return markdown(table.rename_axis(f"{throttle['profile']} ({throttle['volume']})"))


KINDS: dict[str, Callable[..., str]] = {
    "rounds": _rounds,
    "compare": _compare,
    "spread": _spread,
    "between": _between,
    "machine": _machine,
    "tightness": _tightness,
    "untimed": _untimed,
    "csv": _csv,
    "choices": _choices,
    "payloads": _payloads,
    "anchor": _anchor,
    "intervals": _intervals,
    "levers": _levers,
    "explained": _explained,
    "strategies": strategies_markdown,
    "summary": _summary,
    "verdicts": _verdicts,
    "targets": _targets,
    "environment": _environment,
    "cloud": _cloud,
    "forms": forms_markdown,
    "ranks": _ranks,
    "ranks-intervals": _ranks_intervals,
    "rank-requests": _rank_requests,
    "profile": _profile,
    "profiles": _profiles,
    "caps": _caps,
    "disk-profiles": disk_profiles_markdown,
}


def render(spec: str) -> str:
    kind, *args = shlex.split(spec)
    if kind not in KINDS:
        raise CkptbenchError(f"unknown generated block {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind](*args)


def regenerate(check: bool = False, documents: tuple[str, ...] = DOCUMENTS) -> list[Path]:
    """Rewrite every generated block (or, with ``check``, only report them); the files that were out of date."""
    stale = []
    for name in documents:
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_text()
        updated = _BLOCK.sub(lambda m: f"{m[1]}{render(m['spec'])}{m[4]}", text)
        if updated != text:
            stale.append(path)
            if not check:
                path.write_text(updated)
    return stale
