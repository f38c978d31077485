"""TensorStore: one zarr array per tensor, one parameterised writer/reader for every knob the study varies."""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import tensorstore as ts
import torch

from ..errors import CheckpointError
from ..location import Location
from ..manifest import Entry, Layout
from .base import MiB, Pending, Progress, Strategy, Tensors, from_numpy, nbytes, to_numpy

Handed = Literal["borrowed", "owned", "consumed"]
"""How a writer holds the tensors it is given. ``borrowed``: the caller's, TensorStore copies them into its chunks.
``owned``: never changed by anyone else (an async snapshot in one buffer), TensorStore may read them in place
until written. ``consumed``: an async save's own per-array snapshot, each tensor removed from the mapping and
freed once TensorStore has copied it into its chunks, so the snapshot shrinks as those copies grow (referencing
it instead kept the whole snapshot until the last write, beside TensorStore's own chunk copies of the bytes in
flight: ``inflight_bytes`` above one copy of the model)."""

_BLOCK = 4096
_HUGE_PAGE = 2 << 20
_OCDBT_COMMIT_BYTES = 256 << 10
_SHARD_INDEX_ENTRY = 16
_CRC32C = 4
_ZARR_DTYPES = {
    torch.float32: "<f4",
    torch.float16: "<f2",
    torch.bfloat16: "bfloat16",
    torch.float64: "<f8",
    torch.int64: "<i8",
    torch.uint8: "|u1",
}


@dataclass(frozen=True)
class TensorStoreOptions:
    """The knobs of the TensorStore writer; the defaults are the study's unoptimised baseline."""

    dtype: Literal["float32", "float16"] = "float32"
    """On-disk dtype for every tensor it holds exactly; a tensor it cannot hold keeps its own."""
    chunk_bytes: int | None = None
    """Chunk size target (T5X's divisor rule); None is the study's 64 elements per dimension."""
    concurrency: int | None = None
    """``file_io_concurrency`` limit (on S3: ``s3_request_concurrency``); None keeps TensorStore's default."""
    compression: Literal["gzip", "zstd"] | None = None
    """Chunk compressor; None writes raw chunks (TensorStore's zarr v2 would otherwise use blosc)."""
    driver: Literal["file", "ocdbt"] = "file"
    """The kvstore under zarr: plain files, or OCDBT packing chunks into a few data files."""
    format: Literal["zarr", "zarr3"] = "zarr"
    """zarr v2 (a file per chunk) or zarr v3 sharded (a file per tensor: its chunks plus a crc32c'd index)."""
    sync: bool = True
    """TensorStore's fsync of every file it writes (``file_io_sync``); the harness's final sync applies either way."""
    inflight_bytes: int = 0
    """Bytes of tensors being written or read at once; 0 is one tensor after another, as the study did."""
    strict: bool = True
    """A missing chunk is an error: ``fill_missing_data_reads`` false on read and ``store_data_equal_to_fill_value``
    true on write (so a chunk of zeros is still stored). False is TensorStore's default, which reads a missing
    chunk as zeros."""
    checksum: bool = False
    """zarr3 only: a crc32c codec on every inner chunk, so TensorStore itself refuses a chunk whose bytes changed
    (the shard index's crc32c covers only the index)."""
    background: bool = False
    """Copy the tensors, return, and write the copy in a background thread: an asynchronous save."""
    io_mode: Literal["default", "direct", "memmap"] = "default"
    """TensorStore's ``file_io_mode``: buffered reads and writes, O_DIRECT (no page cache), or reads through mmap."""
    fresh_memory: Literal["per-array", "one-buffer", "huge-pages"] = "per-array"
    """Where a copy of the whole model lands (a fresh load, an async save's snapshot): an array per tensor, or
    views of one buffer; ``huge-pages`` asks the kernel to back that buffer with 2 MiB pages, so filling it
    takes about 512 times fewer page faults (transparent huge pages in ``madvise`` mode)."""

    def is_valid(self) -> bool:
        """Whether these knobs make a configuration worth measuring.

        OCDBT packs chunks into its own data files, so zarr3's sharding on top adds only a second index;
        zarr v2 has no checksum codec.
        """
        return not (self.driver == "ocdbt" and self.format == "zarr3") and (self.format == "zarr3" or not self.checksum)

    def missing_chunks(self, *, write: bool) -> dict[str, bool]:
        """The spec members that make a missing chunk an error when ``strict``; none for TensorStore's default."""
        if not self.strict:
            return {}
        return {"store_data_equal_to_fill_value": True} if write else {"fill_missing_data_reads": False}

    @classmethod
    def choices(cls, knob: str) -> tuple[Any, ...] | None:
        """The values a knob allows when its type is a ``Literal`` (``None`` included if optional), else None."""
        hint = get_type_hints(cls)[knob]
        args = [hint] if get_origin(hint) is Literal else list(get_args(hint))
        literals = [v for arg in args if get_origin(arg) is Literal for v in get_args(arg)]
        if not literals:
            return None
        return (*literals, None) if type(None) in args else tuple(literals)

    def disk_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Floats narrow to ``dtype`` when it holds them exactly; integers (steps, RNG states) keep theirs."""
        wanted = getattr(torch, self.dtype)
        return wanted if dtype.is_floating_point and torch.promote_types(dtype, wanted) == wanted else dtype

    def chunk_shape(self, shape: tuple[int, ...], itemsize: int) -> list[int]:
        if self.chunk_bytes is None:
            return [max(1, min(64, d)) for d in shape]
        return divisor_chunks(shape, max(1, self.chunk_bytes // itemsize))

    def context(self, **resources: Any) -> ts.Context:
        """These knobs' context; ``resources`` adds others (a process's thread share, OCDBT's coordinator)."""
        limit = {"limit": self.concurrency}
        spec: dict = {} if self.concurrency is None else {"file_io_concurrency": limit, "s3_request_concurrency": limit}
        if not self.sync:
            spec["file_io_sync"] = False
        if self.io_mode != "default":
            spec["file_io_mode"] = {"mode": self.io_mode}
        return ts.Context({**spec, **resources})

    def metadata(self, shape: list[int], disk: torch.dtype, block_rows: int | None = None) -> dict:
        """The array's zarr metadata; with ``block_rows`` (the rows each of several writers holds), chunk rows
        divide it and a zarr3 shard is one writer's block, so no chunk or shard file has two writers."""
        chunks = self.chunk_shape(tuple(shape), disk.itemsize)
        if block_rows is not None and block_rows < shape[0] and block_rows % chunks[0]:
            chunks[0] = max(d for d in _divisors(block_rows) if d <= chunks[0])
        if self.format == "zarr":
            compressor = None if self.compression is None else {"id": self.compression}
            return {"shape": shape, "chunks": chunks, "dtype": _ZARR_DTYPES[disk], "compressor": compressor}
        inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if self.compression is not None:
            inner.append({"name": self.compression})
        if self.checksum:
            inner.append({"name": "crc32c"})
        shard = [-(-max(1, d) // c) * c for d, c in zip(shape, chunks, strict=True)]
        if block_rows is not None and block_rows < shape[0]:
            shard[0] = block_rows
        sharding = {
            "chunk_shape": chunks,
            "codecs": inner,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        }
        return {
            "shape": shape,
            "data_type": str(disk).removeprefix("torch."),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
            "codecs": [{"name": "sharding_indexed", "configuration": sharding}],
        }

    def kvstore(self, directory: Location, key: str) -> dict:
        if self.driver == "ocdbt":
            return {"driver": "ocdbt", "base": directory.kvstore(), "path": f"{key}/"}
        return directory.kvstore(f"{key}/")

    def describe(self) -> dict[str, str]:
        chunks = "64 per dim" if self.chunk_bytes is None else f"<= {self.chunk_bytes / MiB:g} MiB (T5X rule)"
        shards = "zarr v3, one shard per tensor" + (", crc32c per chunk" if self.checksum else "")
        return {
            "format": "zarr v2, one array per tensor" if self.format == "zarr" else shards,
            "dtype": self.dtype if self.dtype == "float32" else f"{self.dtype} (wider tensors keep theirs)",
            "chunks": chunks,
            "file_io_concurrency": "default" if self.concurrency is None else str(self.concurrency),
            "compression": self.compression or "none",
            "kvstore": self.driver,
            "file_io_sync": "on" if self.sync else "off",
            "in flight": "one tensor" if not self.inflight_bytes else f"<= {self.inflight_bytes / MiB:g} MiB",
            "missing chunk": "error" if self.strict else "reads as zeros",
            "save": "async: returns after copying the tensors, writes the copy in a thread"
            if self.background
            else "synchronous",
            "file_io_mode": self.io_mode,
            "fresh memory": {"per-array": "an array per tensor", "one-buffer": "one buffer, views"}.get(
                self.fresh_memory, "one buffer on huge pages, views"
            ),
        }


_METADATA = (".zarray", "zarr.json")


def array_names(where: str | dict | Path) -> set[str]:
    """The arrays under a folder (``where`` a path) or in an OCDBT database (``where`` its base kvstore)."""
    if isinstance(where, Path):
        return {p.name for p in where.iterdir() if any((p / m).is_file() for m in _METADATA)}
    keys = ts.KvStore.open({"driver": "ocdbt", "base": where}).result().list().result()
    return {key.decode().rpartition("/")[0] for key in keys if key.decode().rpartition("/")[2] in _METADATA}


def divisor_chunks(shape: tuple[int, ...], target_elements: int) -> list[int]:
    """T5X's rule: shrink the largest chunk edge to its next smaller divisor until it fits.

    Divisors keep every chunk full, so zarr v2 never pads edge chunks.
    """
    options = [_divisors(max(1, d)) for d in shape]
    while options and math.prod(o[-1] for o in options) > target_elements:
        largest = max(range(len(options)), key=lambda i: options[i][-1])
        if len(options[largest]) == 1:
            break
        options[largest].pop()
    return [o[-1] for o in options]


def _divisors(n: int) -> list[int]:
    small = [i for i in range(1, math.isqrt(n) + 1) if n % i == 0]
    return sorted({*small, *(n // i for i in small)})


def _ts_dtype(dtype: torch.dtype) -> ts.dtype:
    return ts.bfloat16 if dtype == torch.bfloat16 else ts.dtype(str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class TensorStore(Strategy):
    """One zarr array per tensor, written and read one after another as the study did."""

    name: str
    options: TensorStoreOptions

    def config(self) -> dict[str, Any]:
        return {"library": "tensorstore", **asdict(self.options)}

    def knobs(self) -> dict[str, str]:
        return self.options.describe()

    def unsupported(self, store: str) -> str | None:
        if not self.options.sync and store != "file":
            return "file_io_sync is a file knob: on object storage this is the baseline, `tensorstore`"
        return None

    def reads(self, config: dict[str, Any]) -> bool:
        mine = self.config()
        keys = ("library", "format", "driver")
        return all(config.get(k, "zarr" if k == "format" else None) == mine[k] for k in keys)

    def _spec(self, directory: Location, name: str) -> dict:
        return {"driver": self.options.format, "kvstore": self.options.kvstore(directory, name)}

    def _pipeline(
        self, directory: Location, jobs: Iterable[tuple[str, int, Callable[[], Any]]], progress: Progress
    ) -> list:
        """Start each job while at most ``inflight_bytes`` are outstanding (always at least one); results in order."""
        results: list = []
        pending: deque[tuple[str, int, Any]] = deque()
        outstanding = 0

        def finish() -> None:
            nonlocal outstanding
            name, size, future = pending.popleft()
            try:
                results.append(future.result())
            except ValueError as err:
                raise CheckpointError(f"{directory}: tensor {name}: {err}") from err
            outstanding -= size
            progress(size)

        try:
            for name, size, start in jobs:
                while pending and outstanding + size > self.options.inflight_bytes:
                    finish()
                try:
                    pending.append((name, size, start()))
                except ValueError as err:
                    raise CheckpointError(f"{directory}: tensor {name}: {err}") from err
                outstanding += size
            while pending:
                finish()
        except BaseException:
            # Whoever handles the failure may delete the directory: nothing may still be writing into it.
            for _, _, future in pending:
                with contextlib.suppress(Exception):
                    future.result()
            raise
        return results

    def save(self, tensors: Tensors, directory: Location, progress: Progress) -> Pending | None:
        if not self.options.background:
            self._write(tensors, directory, progress, "borrowed")
            return None
        # The copy is what lets training change its tensors at once; it is the blocking part and one model of memory.
        if self.options.fresh_memory == "per-array":
            snapshot = OrderedDict(
                (name, t.detach().clone(memory_format=torch.contiguous_format)) for name, t in tensors.items()
            )
        else:
            shapes = ((name, t.dtype, tuple(t.shape)) for name, t in tensors.items())
            snapshot = one_buffer(shapes, huge_pages=self.options.fresh_memory == "huge-pages")
            for name, t in tensors.items():
                snapshot[name].copy_(t.detach())
        pool = futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.name} save")
        handed = "consumed" if self.options.fresh_memory == "per-array" else "owned"
        written = pool.submit(self._write, snapshot, directory, progress, handed)
        pool.shutdown(wait=False)

        def finish() -> None:
            try:
                written.result()
            finally:
                # Interrupted while waiting: whoever handles it may delete the directory, so let the writes end first;
                # joining the thread too, as a finished save leaves nothing running (its result is set before it exits).
                pool.shutdown(wait=True)

        return finish

    def _write(self, tensors: Tensors, directory: Location, progress: Progress, handed: Handed) -> None:
        """Every tensor, each handed to TensorStore as ``handed`` says (see ``Handed``)."""
        context = self.options.context()

        def write(name: str) -> Callable[[], Any]:
            def start() -> Any:
                tensor = tensors.pop(name) if handed == "consumed" else tensors[name]
                metadata = self.options.metadata(list(tensor.shape), self.options.disk_dtype(tensor.dtype))
                spec = {**self._spec(directory, name), "metadata": metadata, **self.options.missing_chunks(write=True)}
                array = ts.open(spec, create=True, context=context).result()
                written = array.write(
                    to_numpy(tensor.contiguous()), can_reference_source_data_indefinitely=handed == "owned"
                )
                if handed == "consumed":
                    written.copy.result()  # TensorStore's chunks hold the bytes now; ``tensor`` is freed on return
                return written

            return start

        # Lazily, so a caller's mapping is read as the writes go; a consumed snapshot shrinks: walk a copy of its names.
        names = list(tensors) if handed == "consumed" else tensors
        jobs = ((name, nbytes(tensors[name]), write(name)) for name in names)
        self._pipeline(directory, jobs, progress)

    def _open(self, directory: Location, entry: Entry, context: ts.Context) -> ts.TensorStore:
        """One stored tensor, cast back to the dtype it was saved from; when strict, a missing chunk is an error."""
        spec = {**self._spec(directory, entry.name), "open": True, **self.options.missing_chunks(write=False)}
        array = ts.open(spec, context=context).result()
        if tuple(array.shape) != entry.shape:
            raise CheckpointError(f"{directory}: tensor {entry.name} has shape {array.shape}, expected {entry.shape}")
        return ts.cast(array, _ts_dtype(entry.torch_dtype))

    def _read(self, directory: Location, entry: Entry, context: ts.Context) -> Any:
        return self._open(directory, entry, context).read()

    def _read_into(self, directory: Location, entry: Entry, context: ts.Context, into: torch.Tensor) -> Any:
        """Read straight into ``into``'s memory: TensorStore writes into a view of it, with no array of its own."""
        return ts.array(to_numpy(into), copy=False, write=True).write(self._open(directory, entry, context))

    def load(self, directory: Location, entries: Layout, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        if self.options.fresh_memory != "per-array":
            shapes = ((e.name, e.torch_dtype, e.shape) for e in entries)
            into = one_buffer(shapes, huge_pages=self.options.fresh_memory == "huge-pages")
            self.load_into(directory, entries, into, progress)
            return into
        context = self.options.context()
        jobs = ((e.name, e.nbytes, functools.partial(self._read, directory, e, context)) for e in entries)
        arrays = self._pipeline(directory, jobs, progress)
        return OrderedDict((e.name, from_numpy(a)) for e, a in zip(entries, arrays, strict=True))

    def load_into(self, directory: Location, entries: Layout, into: Tensors, progress: Progress) -> None:
        context = self.options.context()
        jobs = (
            (e.name, e.nbytes, functools.partial(self._read_into, directory, e, context, into[e.name])) for e in entries
        )
        self._pipeline(directory, jobs, progress)

    def stored_names(self, directory: Location) -> set[str] | None:
        """Every array's name: a folder with zarr metadata, or (OCDBT) a metadata key in the database (local only)."""
        if not directory.local:
            return None
        return array_names(directory.kvstore() if self.options.driver == "ocdbt" else directory.folder)

    def load_each(self, directory: Location, entries: Layout) -> Iterator[tuple[Entry, torch.Tensor | Exception]]:
        context = self.options.context()
        for entry in entries:
            try:
                yield entry, from_numpy(self._read(directory, entry, context).result())
            except (ValueError, CheckpointError) as err:
                yield entry, err

    def estimate_bytes(self, tensors: Tensors) -> int:
        total = 0
        for tensor in tensors.values():
            itemsize = self.options.disk_dtype(tensor.dtype).itemsize
            chunks = self.options.chunk_shape(tuple(tensor.shape), itemsize)
            count = math.prod(math.ceil(d / c) for d, c in zip(tensor.shape, chunks, strict=True))
            chunk_nbytes = math.prod(chunks) * itemsize
            if self.options.format == "zarr3":
                chunk_nbytes += _CRC32C if self.options.checksum else 0
                total += _round_up(count * (chunk_nbytes + _SHARD_INDEX_ENTRY) + _BLOCK)
            elif self.options.driver == "file":
                total += count * _round_up(chunk_nbytes)
            else:
                total += count * chunk_nbytes
        if self.options.driver == "ocdbt":
            # Each tensor is its own OCDBT commit, which adds B-tree and version nodes never collected.
            total = total * 5 // 4 + len(tensors) * _OCDBT_COMMIT_BYTES
        return int(total * 1.02) + MiB


def _round_up(size: int, to: int = _BLOCK) -> int:
    return -(-size // to) * to


def one_buffer(
    shapes: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], huge_pages: bool
) -> OrderedDict[str, torch.Tensor]:
    """Empty tensors of these names, dtypes and shapes: views of one anonymous mapping, each at a 4 KiB boundary.

    One mapping lets the kernel be advised once for all of it, and ``huge_pages`` asks it for 2 MiB pages;
    the views keep the mapping alive, so the tensors stay valid as long as any of them is referenced.
    """
    placed, size = [], 0
    for name, dtype, shape in shapes:
        placed.append((name, dtype, shape, size))
        size = _round_up(size + math.prod(shape) * dtype.itemsize)
    memory = mmap.mmap(-1, _round_up(max(size, 1), _HUGE_PAGE))
    if huge_pages:
        memory.madvise(mmap.MADV_HUGEPAGE)
    buffer = torch.frombuffer(memory, dtype=torch.uint8)
    return OrderedDict(
        (name, buffer[at : at + math.prod(shape) * dtype.itemsize].view(dtype).view(shape))
        for name, dtype, shape, at in placed
    )
