"""What a result depends on besides the code: versions, hardware, the disk and the commit."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil

_PACKAGES = ("torch", "tensorstore", "numpy", "transformers", "pandas", "orbax-checkpoint", "jax", "ckptbench")
MEMORY_ENV = (
    "THP_MEM_ALLOC_ENABLE",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MALLOC_ARENA_MAX",
    "MALLOC_TRIM_THRESHOLD_",
)
"""Environment variables that change what fresh memory and threads cost (torch's huge-page allocator, glibc's heap)."""
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def huge_pages() -> str | None:
    """The kernel's transparent-huge-page mode (the bracketed word): what landing bytes in fresh memory costs."""
    try:
        text = _THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()


def filesystem(path: Path) -> str | None:
    """The device, type and mount point of the filesystem holding ``path``."""
    resolved, best = path.resolve(), None
    for part in psutil.disk_partitions(all=True):
        if resolved.is_relative_to(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    return None if best is None else f"{best.device} ({best.fstype}) on {best.mountpoint}"


def collect(directory: Path) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(directory)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in _PACKAGES},
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "disk_total_bytes": disk.total,
        "disk_free_bytes": disk.free,
        "filesystem": filesystem(directory),
        "git_commit": _git_commit(),
        "transparent_hugepage": huge_pages(),
        "memory_env": {name: os.environ[name] for name in MEMORY_ENV if name in os.environ},
    }
