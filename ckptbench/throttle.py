"""The kernel's I/O throttle: a cgroup for the run, capping its I/O on the block device under ``--out``.

The run's process joins the group, so everything it starts afterwards does its I/O there too: its
threads (TensorStore's, an async save's), the ranks it spawns, fio and the probes. Through cgroup v1
``blkio.throttle.*_device`` where the blkio controller is mounted (as on this machine), else cgroup2
``io.max``. A group is named with its run's pid, like a partial checkpoint: a run removes its own at
the end (the CLI's exit, Ctrl-C and errors included, and at interpreter exit), and the next run
removes one whose run was killed. Each refusal is one line saying what to do.

The throttle holds what the process itself submits. Writeback done later by the kernel's flusher
threads is charged to no group under cgroup v1, so a write left in the page cache may escape it; the
probe measures the ceilings under the caps, and a cap they miss is reported, not assumed.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import CkptbenchError
from .profiles import Caps

PREFIX = "ckptbench-"
_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)-[0-9a-f]+$")
_V1_FILES = {
    "read_bps": "blkio.throttle.read_bps_device",
    "write_bps": "blkio.throttle.write_bps_device",
    "read_iops": "blkio.throttle.read_iops_device",
    "write_iops": "blkio.throttle.write_iops_device",
}
_V2_KEYS = {"read_bps": "rbps", "write_bps": "wbps", "read_iops": "riops", "write_iops": "wiops"}
_EMPTY_TIMEOUT_S = 10.0


class ThrottleError(CkptbenchError):
    """The throttle cannot be set up here; the message says what to do instead."""


@dataclass(frozen=True)
class Hierarchy:
    """Where the controller is mounted: cgroup v1's blkio hierarchy or cgroup2's unified one."""

    version: int
    root: Path

    @property
    def controller(self) -> str:
        return f"cgroup v1 blkio at {self.root}" if self.version == 1 else f"cgroup2 io at {self.root}"


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, type, options) of every mount, from /proc/self/mounts."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4:
            found.append((fields[1].replace("\\040", " "), fields[2], fields[3].split(",")))
    return found


def hierarchy() -> Hierarchy:
    """cgroup v1's blkio hierarchy when mounted, else cgroup2's when the io controller is available in it."""
    mounts = _mounts()
    for point, kind, options in mounts:
        if kind == "cgroup" and "blkio" in options:
            return Hierarchy(1, Path(point))
    for point, kind, _ in mounts:
        if kind == "cgroup2" and "io" in (Path(point) / "cgroup.controllers").read_text().split():
            return Hierarchy(2, Path(point))
    raise ThrottleError(
        "no I/O controller to throttle with: mount cgroup v1's blkio or enable cgroup2's io controller, "
        "or run with --disk-profile none"
    )


@dataclass(frozen=True)
class Device:
    major: int
    minor: int
    name: str

    def __str__(self) -> str:
        return f"{self.major}:{self.minor}"


def _whole_disk(major: int, minor: int) -> Device | None:
    """The disk holding block device major:minor (a partition's parent, which the throttle needs)."""
    node = Path(f"/sys/dev/block/{major}:{minor}")
    if not node.exists():
        return None
    node = node.resolve()
    if (node / "partition").exists():
        node = node.parent
    major, minor = (int(n) for n in (node / "dev").read_text().split(":"))
    return Device(major, minor, node.name)


def device(path: Path) -> Device:
    """The block device under the filesystem holding ``path``; refused for tmpfs, overlay and the like."""
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    st_dev = os.stat(existing).st_dev
    found = _whole_disk(os.major(st_dev), os.minor(st_dev))
    if found is None:  # an anonymous device (btrfs, overlay, tmpfs): the mount's source may be a block device
        source, kind = _mount_of(existing)
        if source.startswith("/dev/") and Path(source).is_block_device():
            rdev = os.stat(source).st_rdev
            found = _whole_disk(os.major(rdev), os.minor(rdev))
        if found is None:
            raise ThrottleError(
                f"{path} is on {kind} ({source}), which has no block device to throttle: "
                "put --out on a disk, or run with --disk-profile none"
            )
    return found


def _mount_of(path: Path) -> tuple[str, str]:
    """(source, type) of the mount holding ``path``: the longest mount point above it."""
    resolved = path.resolve()
    best = ("", "", "")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, point, kind = line.split()[:3]
        if resolved.is_relative_to(point) and len(point) >= len(best[1]):
            best = (source, point, kind)
    return best[0], best[2]


def _own_path(hierarchy: Hierarchy, pid: int | str = "self") -> Path:
    """The group ``pid`` is in, within ``hierarchy``."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (hierarchy.version == 1 and "blkio" in controllers.split(",")) or (
            hierarchy.version == 2 and controllers == ""
        ):
            return hierarchy.root / path.lstrip("/")
    return hierarchy.root


def _move(pid: int, group: Path) -> None:
    (group / "cgroup.procs").write_text(str(pid))


def _write_caps(hierarchy: Hierarchy, group: Path, device: Device, caps: Caps) -> None:
    if hierarchy.version == 1:
        for field, name in _V1_FILES.items():
            value = getattr(caps, field)
            if value is not None:
                (group / name).write_text(f"{device} {value}")
        return
    if "io" not in (hierarchy.root / "cgroup.subtree_control").read_text().split():
        (hierarchy.root / "cgroup.subtree_control").write_text("+io")
    keys = " ".join(f"{key}={getattr(caps, field)}" for field, key in _V2_KEYS.items() if getattr(caps, field))
    (group / "io.max").write_text(f"{device} {keys}")


@dataclass
class Group:
    """A throttle group this process made and joined; ``leave`` takes it back out and removes the group."""

    hierarchy: Hierarchy
    path: Path
    device: Device
    caps: Caps
    origin: Path
    """The group the process came from, which it goes back to."""

    def describe(self) -> dict:
        """What the run's environment records about the throttle."""
        return {
            "group": self.path.name,
            "controller": self.hierarchy.controller,
            "device": f"{self.device.name} ({self.device})",
            "caps": self.caps.spec(),
        }

    def leave(self) -> None:
        """Move this process (and anything it left running in the group) back out, then remove the group."""
        if not self.path.exists():
            return
        _move(os.getpid(), self.origin)
        _remove(self.path, self.origin)


def _remove(group: Path, to: Path) -> None:
    """Move what is still in ``group`` to ``to`` and remove it, waiting briefly for exiting processes."""
    deadline = time.monotonic() + _EMPTY_TIMEOUT_S
    while True:
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                _move(int(pid), to)
            except (ProcessLookupError, OSError):  # exited meanwhile, or a zombie: it leaves by itself
                continue
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise ThrottleError(f"could not remove the throttle group {group}: {err}") from None
            time.sleep(0.05)


_joined: Group | None = None
"""The group this process made and is in, if any."""


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ThrottleError("the I/O throttle needs root (it makes a cgroup): run as root, or --disk-profile none")


def check(out: Path) -> tuple[Hierarchy, Device]:
    """Refuse early, in one line, when the throttle cannot work for ``out``; else where it would act."""
    _require_root()
    return hierarchy(), device(out)


def enter(out: Path, caps: Caps) -> Group | None:
    """Put this process in a group capping ``caps`` on the device under ``out``; no caps: out of any group.

    Idempotent: a process already in a group with these caps stays; one in another leaves it first.
    A process started inside a group its parent made (a spawned rank) is left where it is: the group
    returned is then its parent's, which the parent removes.
    """
    global _joined
    if _joined is not None:
        if not caps.empty and _joined.caps == caps and _joined.device == device(out):
            return _joined
        leave()
    if caps.empty:
        return None
    found, dev = check(out)
    inherited = _own_path(found)
    if _NAME.match(inherited.name):
        return Group(found, inherited, dev, caps, found.root)
    group = found.root / f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    group.mkdir()
    try:
        _write_caps(found, group, dev, caps)
        _move(os.getpid(), group)
    except BaseException:
        _remove(group, inherited)
        raise
    _joined = Group(found, group, dev, caps, inherited)
    return _joined


def inherited() -> bool:
    """Whether this process was started inside a throttle group another process made (a spawned rank)."""
    if _joined is not None or os.geteuid() != 0:
        return False
    try:
        return bool(_NAME.match(_own_path(hierarchy()).name))
    except ThrottleError:
        return False


def follow(pid: int) -> None:
    """Join the throttle group process ``pid`` is in, if it is in one and this process in another: a worker
    started by a fork server that began before its parent entered the group."""
    if os.geteuid() != 0:
        return
    try:
        found = hierarchy()
    except ThrottleError:
        return
    group = _own_path(found, pid)
    if _NAME.match(group.name) and group != _own_path(found):
        _move(os.getpid(), group)


def active() -> bool:
    """Whether this process's I/O is throttled: in a group it made, or in one its parent made."""
    return _joined is not None or inherited()


def refuse_above(caps: Caps, read_gbps: float, write_gbps: float) -> None:
    """Caps above the raw disk's measured ceilings would emulate nothing: refused, naming the ceiling."""
    for what, cap, ceiling in (("read", caps.read_bps, read_gbps), ("write", caps.write_bps, write_gbps)):
        if cap is not None and cap > ceiling * 1e9:
            raise ThrottleError(
                f"a {what} cap of {cap / 1e6:,.0f} MB/s is above this disk's measured {what} ceiling "
                f"({ceiling * 1e3:,.0f} MB/s): choose a smaller cap or another disk"
            )


def leave() -> None:
    """Take this process out of the group it made and remove the group; nothing when there is none."""
    global _joined
    if _joined is not None:
        joined, _joined = _joined, None
        joined.leave()


atexit.register(leave)


def clean_stale() -> list[str]:
    """Remove the throttle groups of runs that no longer run (killed); a live run's are left alone."""
    if os.geteuid() != 0:
        return []
    try:
        found = hierarchy()
    except ThrottleError:
        return []
    removed = []
    for group in found.root.iterdir():
        owner = _NAME.match(group.name)
        if owner and group.is_dir() and not psutil.pid_exists(int(owner[1])):
            _remove(group, found.root)
            removed.append(str(group))
    return removed
