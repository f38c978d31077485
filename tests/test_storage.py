"""A new store is one module and one registry line: an in-memory ``mem://`` store, written here, runs strategies.

``MemoryLocation`` and ``MemoryStorage`` below are everything such a module holds; the registry line
is the ``STORES`` entry each test adds. Nothing else in ckptbench learns about ``mem://``: the run's
validation, the strategies, the manifest, the commit protocol, ``verify``, ``list`` and the verdicts'
store kind all find it through the registry and the location interface.
"""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ckptbench import Benchmark, CheckpointError, RunConfig, TorchSave, checkpoint, get_strategy, storage, verdict
from ckptbench.cli import main
from ckptbench.disk import DiskUsage
from ckptbench.errors import UsageError
from ckptbench.limits import Limits, ProbeSettings, Stream
from ckptbench.location import Location, Source, Storage, T
from ckptbench.manifest import MANIFEST
from ckptbench.results import COLUMNS

from conftest import FAKE_LIMITS

# --- the new store's module ---------------------------------------------------------------------------------------

OBJECTS: dict[str, dict[str, bytes]] = {}
"""Every in-memory bucket: its objects by key."""


@dataclass(frozen=True)
class MemoryLocation(Location):
    """A prefix in an in-memory bucket: written in place, complete once its manifest is there."""

    bucket: str
    key: str

    def __truediv__(self, name: str) -> MemoryLocation:
        return MemoryLocation(self.bucket, f"{self.key}{name}/")

    def __str__(self) -> str:
        return f"mem://{self.bucket}/{self.key}"

    def where(self, name: str) -> str:
        return f"{self}{name}"

    def write(self, name: str, fill: Callable[[Source], None]) -> None:
        buffer = io.BytesIO()
        fill(buffer)
        OBJECTS[self.bucket][f"{self.key}{name}"] = buffer.getvalue()

    def read(self, name: str, parse: Callable[[Source], T]) -> T:
        try:
            data = OBJECTS[self.bucket][f"{self.key}{name}"]
        except KeyError:
            raise FileNotFoundError(self.where(name)) from None
        return parse(io.BytesIO(data))

    def put_text(self, name: str, text: str) -> None:
        OBJECTS[self.bucket][f"{self.key}{name}"] = text.encode()

    def get_text(self, name: str) -> str | None:
        data = OBJECTS[self.bucket].get(f"{self.key}{name}")
        return None if data is None else data.decode()

    def kvstore(self, path: str = "") -> dict:
        raise UsageError(f"{self}: TensorStore's memory kvstore lives in one context; nothing to share")

    def objects(self) -> list[str]:
        return [k for k in OBJECTS[self.bucket] if k.startswith(self.key)]

    def stage(self) -> MemoryLocation:
        return self

    def sync(self) -> None:
        """Nothing to make durable."""

    def publish(self, final: Location) -> None:
        assert final == self

    def remove(self) -> None:
        OBJECTS[self.bucket].pop(f"{self.key}{MANIFEST}", None)
        for key in self.objects():
            del OBJECTS[self.bucket][key]


class MemoryStorage(Storage):
    """``mem://BUCKET/PREFIX``: a run's checkpoints in this process's memory."""

    kind = "mem"
    form = "mem://BUCKET/PREFIX"
    local = False

    def __init__(self, url: str) -> None:
        self.url = url
        bucket, _, prefix = url.removeprefix("mem://").partition("/")
        self.root = MemoryLocation(bucket, "".join(f"{p}/" for p in prefix.split("/") if p))
        OBJECTS.setdefault(bucket, {})
        self._names = itertools.count()

    @classmethod
    def validate(cls, url: str, endpoint: str | None) -> None:
        if not url.removeprefix("mem://").partition("/")[0]:
            raise UsageError(f"--store {url!r}: expected mem://BUCKET/PREFIX")

    @classmethod
    def open(cls, url: str, out: Path, endpoint: str | None, injected_rtt_ms: float | None) -> MemoryStorage:
        return cls(url)

    @classmethod
    def locate(cls, url: str, endpoint: str | None, injected_rtt_ms: float | None) -> MemoryLocation:
        return cls(url).root

    @property
    def measured_on(self) -> str:
        return "memory"

    def working(self, name: str) -> MemoryLocation:
        return self.root / ".work" / f"{name}.{next(self._names)}"

    def settle(self, location: Location) -> DiskUsage:
        sizes = [len(OBJECTS[self.root.bucket][k]) for k in location.objects()]
        return DiskUsage(sum(sizes), sum(sizes), len(sizes))

    def install(self, location: Location, name: str) -> MemoryLocation:
        final = self.root / name
        final.remove()
        objects = OBJECTS[self.root.bucket]
        marker = f"{location.key}{MANIFEST}"
        for key in sorted(location.objects(), key=lambda k: k == marker):  # the manifest last
            objects[f"{final.key}{key.removeprefix(location.key)}"] = objects[key]
        location.remove()
        return final

    def clean_stale(self) -> list[str]:
        return []

    def limits(self, settings: ProbeSettings, reprobe: bool = False) -> Limits:
        probe = self.stream(settings.total_bytes)
        return Limits(probe.write_gbps, probe.read_gbps, settings.total_bytes, probe.seconds, tool="bytes copied")

    def stream(self, size: int) -> Stream:
        started = time.perf_counter()
        copy = bytes(bytearray(size))
        seconds = max(time.perf_counter() - started, 1e-9)
        return Stream(len(copy) / seconds / 1e9, len(copy) / seconds / 1e9, seconds)


# --- the tests ----------------------------------------------------------------------------------------------------


@pytest.fixture
def mem(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """The registry line that adds the store; its bucket ``b``, emptied afterwards."""
    monkeypatch.setitem(storage.STORES, "mem", MemoryStorage)
    OBJECTS["b"] = {}
    yield OBJECTS["b"]
    del OBJECTS["b"]


def test_the_registry_resolves_every_store_by_scheme(mem, tmp_path):
    assert isinstance(storage.open_storage("file", tmp_path), storage.STORES["file"])
    assert isinstance(storage.open_storage("mem://b/run", tmp_path), MemoryStorage)
    assert storage.location("mem://b/run/ckpt") == MemoryLocation("b", "run/ckpt/")
    assert str(storage.location(tmp_path / "ckpt")) == str(tmp_path / "ckpt")
    assert storage.location(str(tmp_path)).folder == tmp_path
    assert storage.remote_kinds() == ["s3", "mem"]
    RunConfig(preset="tiny", out=tmp_path, store="mem://b/run")
    with pytest.raises(UsageError, match="expected 'file' or s3://BUCKET/PREFIX or mem://BUCKET/PREFIX"):
        RunConfig(preset="tiny", out=tmp_path, store="gs://bucket/x")
    with pytest.raises(UsageError, match="expected mem://BUCKET/PREFIX"):
        RunConfig(preset="tiny", out=tmp_path, store="mem:///x")
    with pytest.raises(UsageError, match="need an s3:// or mem:// --store"):
        RunConfig(preset="tiny", out=tmp_path, s3_endpoint="http://127.0.0.1:1")
    with pytest.raises(UsageError, match="an mem:// --store is one process's"):
        RunConfig(preset="tiny", out=tmp_path, store="mem://b/run", ranks=2)
    with pytest.raises(UsageError, match="is not a local folder"):
        MemoryLocation("b", "x/").folder  # noqa: B018 - the property is what refuses


def test_strategies_run_through_a_new_store_bit_exact_and_what_cannot_is_skipped(mem, tiny, tmp_path):
    config = RunConfig(
        preset="tiny", out=tmp_path / "out", progress=False, warmup=True, drift=False, keep_checkpoints=True,
        store="mem://b/run",
    )  # fmt: skip
    messages: list[str] = []
    bench = Benchmark(config, checkpoint=tiny, limits=FAKE_LIMITS, log=messages.append)
    phases = {p.strategy: p for p in bench.run(["pytorch", "safetensors", "dcp", "orbax"])}
    assert phases["dcp"].skipped.startswith("torch.distributed.checkpoint writes through a filesystem")
    assert phases["orbax"].skipped is not None
    for name in ("pytorch", "safetensors"):
        assert phases[name].ok, phases[name].error
        (row,) = phases[name].rows
        assert (row.store, row.files, row.verified) == ("mem://b/run", 2, True)
        kept = MemoryLocation("b", f"run/{name}/")
        assert sorted(kept.objects()) == sorted([f"run/{name}/{MANIFEST}", f"run/{name}/{get_strategy(name).filename}"])
        assert row.bytes == sum(len(mem[k]) for k in kept.objects())
        found = checkpoint.verify(f"mem://b/run/{name}")
        assert (found.intact, found.tensors, found.strategy) == (True, len(tiny.tensors), name)
        into = {n: torch.empty_like(t) for n, t in tiny.tensors.items()}
        checkpoint.load(get_strategy(name), kept, lambda n: None, into=into)  # safetensors reads into place
        assert all(torch.equal(into[n].view(torch.uint8), t.view(torch.uint8)) for n, t in tiny.tensors.items())
    assert [k for k in mem if "/.work/" in k] == []  # warm-ups and working copies are gone
    assert verdict.store_kind(bench.results) == "mem"
    assert list(bench.results.columns) == COLUMNS


def test_a_save_that_fails_on_a_new_store_leaves_no_checkpoint(mem, tiny, tmp_path):
    class Fails(TorchSave):
        def save(self, tensors, directory, progress):
            super().save(tensors, directory, progress)
            raise OSError("the store went away")

    config = RunConfig(preset="tiny", out=tmp_path, progress=False, warmup=False, drift=False, store="mem://b/run")
    bench = Benchmark(config, checkpoint=tiny, limits=FAKE_LIMITS, log=lambda message: None)
    (phase,) = bench.run([Fails("fails")])
    (row,) = phase.rows
    assert "the store went away" in row.error
    assert mem == {}  # the data written before the failure was removed; no manifest ever was
    with pytest.raises(CheckpointError, match="not a complete ckptbench checkpoint"):
        checkpoint.verify("mem://b/run/.work/fails.0")


def test_list_names_each_remote_store(mem, capsys):
    assert main(["list"]) == 0
    narrow = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.split()}
    assert narrow["name"][-4:] == ["on", "s3", "on", "mem"]
    assert narrow["pytorch+mmap"][-2:] == ["no", "no"]
    assert narrow["safetensors"][-2:] == ["yes", "yes"]
    assert main(["list", "--wide"]) == 0
    wide = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line.split()}
    assert wide["pytorch+mmap"].count("mmap needs a local file") == 2  # on s3 and on mem
