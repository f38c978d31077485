"""Shared fixtures: the tiny model, every eight-way strategy saved once, and quick Benchmark sessions."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest

try:
    import ckptbench
except ModuleNotFoundError:  # plain `pytest` from elsewhere: the package sits next to tests/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ckptbench

from ckptbench import checkpoint, disk, manifest, read_results
from ckptbench.limits import Limits
from ckptbench.local import Folder
from ckptbench.location import staged
from ckptbench.model import ModelCheckpoint
from ckptbench.s3server import S3Server
from ckptbench.strategies import Strategy


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
    """Every name in ``directory`` (none when it does not exist), sorted."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def dead_pid() -> int:
    """The process id of a process that has just exited: what a dead run's leftovers carry in their names."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not psutil.pid_exists(child.pid), "the pid was reused at once; cannot make a dead run's leftovers"
    return child.pid


@pytest.fixture(scope="session")
def saved(tiny: ModelCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Saved]:
    """Each of the eight strategies' checkpoints of ``tiny``, made durable and measured with ``disk.evict``."""
    root = tmp_path_factory.mktemp("eight-way")
    result = {}
    for name in ckptbench.EIGHT_WAY:
        progress: list[int] = []
        usage = save_checkpoint(ckptbench.get_strategy(name), tiny.tensors, root / name, progress.append)
        result[name] = Saved(name, root / name, usage, sum(progress))
    return result


@pytest.fixture
def fake_limits() -> Limits:
    """Disk limits given up front, so a Benchmark skips the (slower) probe."""
    return Limits(write_gbps=1.0, read_gbps=2.0, probe_bytes=0, files_per_s=1000.0, fresh_copy_gbps=1.0)


@pytest.fixture
def make_bench(tiny: ModelCheckpoint, tmp_path: Path, fake_limits: Limits) -> Callable[..., ckptbench.Benchmark]:
    """A quiet, fast Benchmark on the shared tiny model in ``tmp_path/out``; keywords are RunConfig settings."""

    def make(*, log=lambda message: None, limits=fake_limits, **settings) -> ckptbench.Benchmark:
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


# --- ``python -m ckptbench`` as a real process, as a user runs it (the fault tests kill, damage and fill) ---

PACKAGE_ROOT = Path(ckptbench.__file__).resolve().parents[1]
QUICK = ("--preset", "tiny", "--no-warmup", "--no-drift")
"""The fastest run that still saves, loads and verifies every tensor."""


def environment() -> dict[str, str]:
    """This checkout's package first, whatever is installed."""
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
