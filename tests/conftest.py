"""Shared fixtures and helpers: the tiny model, each strategy's checkpoint saved once, fake disk limits,
quick Benchmark sessions, ``python -m ckptbench`` as a process, the notebook, and the fast/slow split.

``python -m pytest -q`` runs the fast tests; ``--slow`` adds the tests marked slow (``SLOW``): the whole
suite, as CI runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import psutil
import pytest

try:
    import ckptbench
except ModuleNotFoundError:  # plain `pytest` from elsewhere: the package sits next to tests/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ckptbench

from ckptbench import TensorStore, checkpoint, disk, get_strategy, manifest, read_results
from ckptbench.limits import CACHE_DIR, Limits
from ckptbench.local import Folder
from ckptbench.location import staged
from ckptbench.model import ModelCheckpoint
from ckptbench.s3server import S3Server
from ckptbench.strategies import Strategy

# --- the fast set by default, the slow set with --slow --------------------------------------------------------

SLOW = "the notebook, CLI processes, rank groups, the S3 server, the fault suite, models of 100s of MB"
_LEFT_OUT = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        help=f"run the tests marked slow too ({SLOW}): the whole suite, as CI runs it",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --slow (and without an -m expression of the user's own), deselect the slow tests, counted."""
    if config.getoption("--slow") or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
        config.stash[_LEFT_OUT] = len(slow)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Say why tests were deselected, so a fast run is never mistaken for the whole suite."""
    if left_out := config.stash.get(_LEFT_OUT, 0):
        terminalreporter.write_line(
            f"{left_out} slow tests deselected ({SLOW}); `python -m pytest -q --slow` runs the whole suite"
        )


@dataclass(frozen=True)
class Saved:
    """One strategy's checkpoint of the tiny model, saved once per session; never modify it in a test."""

    name: str
    path: Path
    usage: disk.DiskUsage
    progress_bytes: int


@pytest.fixture(scope="session")
def tiny() -> ModelCheckpoint:
    """The tiny preset (seed 0). Shared: tests that change tensors must copy them first."""
    return ckptbench.model.build("tiny")


def save_checkpoint(strategy: Strategy, tensors, path: Path, progress=lambda n: None) -> disk.DiskUsage:
    """A complete checkpoint (files, manifest, sync, rename) as the harness writes it; its size on disk."""
    layout = manifest.layout(tensors, manifest.digests(tensors))
    with staged(Folder(path)) as staging:
        checkpoint.save(strategy, tensors, layout, staging, progress)
    return disk.evict(path)


def load_checkpoint(strategy: Strategy, path: Path, progress=lambda n: None):
    return checkpoint.load(strategy, path, progress)


def leftovers(directory: Path) -> list[str]:
    """Every name in ``directory`` but a run's records (``runs/`` and the disk limits' cache), sorted; none
    when it does not exist. What a run leaves: its results and figures, kept checkpoints, anything partial."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name not in ("runs", CACHE_DIR))


def written(printed: str) -> list[str]:
    """The names of the files a command said it wrote (``wrote PATH``)."""
    return [Path(line.removeprefix("wrote ")).name for line in printed.splitlines() if line.startswith("wrote ")]


def dead_pid() -> int:
    """The process id of a process that has just exited: what a dead run's leftovers carry in their names."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not psutil.pid_exists(child.pid), "the pid was reused at once; cannot make a dead run's leftovers"
    return child.pid


class SavedCheckpoints:
    """Each registered strategy's checkpoint of the tiny model, saved (made durable, measured with
    ``disk.evict``) the first time a test asks for it, then shared by every test of the session."""

    def __init__(self, tiny: ModelCheckpoint, root: Path) -> None:
        self._tiny = tiny
        self._root = root
        self._saved: dict[str, Saved] = {}

    def __getitem__(self, name: str) -> Saved:
        if name not in self._saved:
            progress: list[int] = []
            path = self._root / name
            usage = save_checkpoint(get_strategy(name), self._tiny.tensors, path, progress.append)
            self._saved[name] = Saved(name, path, usage, sum(progress))
        return self._saved[name]


@pytest.fixture(scope="session")
def saved(tiny: ModelCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> SavedCheckpoints:
    """``saved[name]``: strategy ``name``'s checkpoint of ``tiny``, saved once per session."""
    return SavedCheckpoints(tiny, tmp_path_factory.mktemp("saved"))


FAKE_LIMITS = Limits(write_gbps=1.0, read_gbps=2.0, probe_bytes=0, files_per_s=1000.0, fresh_copy_gbps=1.0)
"""Disk limits given up front, so a Benchmark skips the (slower) probe; no test reads a figure from them."""


@pytest.fixture
def make_bench(tiny: ModelCheckpoint, tmp_path: Path) -> Callable[..., ckptbench.Benchmark]:
    """A quiet, fast Benchmark on the shared tiny model in ``tmp_path/out``; keywords are RunConfig settings."""

    def make(*, log=lambda message: None, limits=FAKE_LIMITS, **settings) -> ckptbench.Benchmark:
        config = ckptbench.RunConfig(
            **{
                "preset": "tiny",
                "out": tmp_path / "out",
                "progress": False,
                "warmup": False,
                "drift": False,
                **settings,
            }
        )
        return ckptbench.Benchmark(config, checkpoint=tiny, limits=limits, log=log)

    return make


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS on loopback) with the bucket ``ckpt``; its key pair is in the environment."""
    with S3Server("ckpt", data_dir=tmp_path_factory.mktemp("s3")) as server, pytest.MonkeyPatch.context() as env:
        for name, value in server.env.items():
            env.setenv(name, value)
        yield server


@dataclass(frozen=True)
class FaultMidSave(TensorStore):
    """A TensorStore strategy whose save calls ``action`` once ``after`` bytes are written: a fault that strikes
    while objects are still being sent, with some already stored and more to come."""

    action: Callable[[], Any]
    after: int

    def save(self, tensors, directory, progress):
        written = 0

        def watch(size: int) -> None:
            nonlocal written
            if written <= self.after < written + size:
                self.action()
            written += size
            progress(size)

        return super().save(tensors, directory, watch)


@pytest.fixture
def fault_mid_save(tiny: ModelCheckpoint) -> Callable[[Callable[[], Any]], FaultMidSave]:
    """``fault_mid_save(action)``: ts+chunks (named ``dies``) calling ``action`` (stop a server, a volume server)
    once a third of the tiny model is written; the S3 fault tests share it."""
    return lambda action: FaultMidSave("dies", get_strategy("ts+chunks").options, action, tiny.nbytes // 3)


# --- ``python -m ckptbench`` as a real process, as a user runs it (the fault tests kill, damage and fill) ---

PACKAGE_ROOT = Path(ckptbench.__file__).resolve().parents[1]
QUICK = ("--preset", "tiny", "--no-warmup", "--no-drift")
"""The fastest run that still saves, loads and verifies every tensor."""


def environment() -> dict[str, str]:
    """This process's environment with this checkout's package first on PYTHONPATH, whatever is installed:
    for every process a test starts (runs, ranks under torchrun, the notebook's kernel)."""
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def command(*args: object) -> list[str]:
    return [sys.executable, "-m", "ckptbench", *map(str, args)]


def run(*args: object, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args), cwd=cwd, env=environment(), capture_output=True, text=True, errors="replace", timeout=timeout
    )


def start(*args: object, cwd: Path, log: Path) -> subprocess.Popen:
    """Start a run whose output (progress bars included) goes to ``log``."""
    with log.open("wb") as output:
        return subprocess.Popen(command(*args), cwd=cwd, env=environment(), stdout=output, stderr=subprocess.STDOUT)


def one_line_error(stderr: str) -> str:
    """The single error line of a failed command, which must not have printed a traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def rows(csv: Path) -> pd.DataFrame:
    """A results file's rows; any damaged line fails the test (it would have been skipped with a warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_results(csv)


# --- the notebook, as papermill and nbclient run it ---------------------------------------------------------------

NOTEBOOK = PACKAGE_ROOT / "main.ipynb"
NOTEBOOK_TIMEOUT = 600
"""Seconds a cell may take on the tiny preset."""


def tagged(nb: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if tag in cell.metadata.get("tags", [])]


@pytest.fixture(scope="module")
def kernel_env() -> Iterator[None]:
    """A kernel started in the test imports this checkout's ckptbench, even where it is not installed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", environment()["PYTHONPATH"])
        yield
