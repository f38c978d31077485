"""How a checkpoint is written and read: one class per library, one registry entry per approach.

Every TensorStore approach is the same writer/reader with different ``TensorStoreOptions``, so an
ablation differs from the baseline in exactly the field it names. Strategies write into a
directory they are given and never sync: the harness makes every save durable the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import ml_dtypes
import numpy as np
import safetensors
import safetensors.torch
import tensorstore as ts
import torch
import torch.distributed.checkpoint as dcp

from .errors import CheckpointError, UnknownChoiceError

Tensors = Mapping[str, torch.Tensor]
Progress = Callable[[int], None]
"""Called with the number of bytes of model data just written or read."""

MiB = 1 << 20
_BLOCK = 4096
_OCDBT_COMMIT_BYTES = 256 << 10
_SHARD_INDEX_ENTRY = 16
_ORDER = "ckptbench.order"
_MANIFEST = "manifest.json"
_MANIFEST_FORMAT = "ckptbench-tensorstore/1"
_ZARR_DTYPES = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "bfloat16", torch.float64: "<f8"}
_TORCH_DTYPES = {str(dtype): dtype for dtype in _ZARR_DTYPES}


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def total_bytes(tensors: Tensors) -> int:
    """Bytes of model data in a mapping: what progress counts and what throughput is measured against."""
    return sum(nbytes(t) for t in tensors.values())


class Strategy(ABC):
    """Saves a mapping of tensors into a directory and loads it back in the original dtypes."""

    name: str

    @abstractmethod
    def knobs(self) -> dict[str, str]:
        """What this strategy sets, for tables and the guide."""

    @abstractmethod
    def save(self, tensors: Tensors, directory: Path, progress: Progress) -> None: ...

    @abstractmethod
    def load(self, directory: Path, progress: Progress) -> OrderedDict[str, torch.Tensor]: ...

    @abstractmethod
    def estimate_bytes(self, tensors: Tensors) -> int:
        """An upper bound of the disk space a save needs, checked before writing."""


class SingleFile(Strategy):
    """A library that writes the whole mapping into one file; subclasses say how it is written and read."""

    filename: str

    @abstractmethod
    def write(self, tensors: Tensors, path: Path) -> None: ...

    @abstractmethod
    def read(self, path: Path) -> OrderedDict[str, torch.Tensor]: ...

    def save(self, tensors: Tensors, directory: Path, progress: Progress) -> None:
        self.write(tensors, directory / self.filename)
        progress(total_bytes(tensors))

    def load(self, directory: Path, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        path = directory / self.filename
        if not path.is_file():
            raise CheckpointError(f"{directory}: no {self.filename}; not a complete {self.name} checkpoint")
        try:
            tensors = self.read(path)
        except Exception as err:  # the libraries raise their own errors (pickle, zip, SafetensorError) for damage
            raise CheckpointError(f"{path}: unreadable {self.name} checkpoint: {err}") from err
        progress(total_bytes(tensors))
        return tensors

    def estimate_bytes(self, tensors: Tensors) -> int:
        return total_bytes(tensors) + MiB


@dataclass(frozen=True)
class TorchSave(SingleFile):
    """``torch.save`` of the whole mapping to one file; ``torch.load(weights_only=True)``."""

    name: str
    mmap: bool = False
    """Map the file and copy each tensor out of it: the copy is what makes the load's I/O count."""
    filename: str = "model.pt"

    def knobs(self) -> dict[str, str]:
        load = "torch.load(weights_only=True, mmap=True) + copy" if self.mmap else "torch.load(weights_only=True)"
        return {"format": "torch.save zip, one file", "dtype": "model's", "load": load}

    def write(self, tensors: Tensors, path: Path) -> None:
        torch.save(OrderedDict(tensors), path)

    def read(self, path: Path) -> OrderedDict[str, torch.Tensor]:
        tensors = torch.load(path, weights_only=True, mmap=self.mmap)
        if self.mmap:
            tensors = OrderedDict((name, tensor.clone()) for name, tensor in tensors.items())
        return tensors


@dataclass(frozen=True)
class SafeTensors(SingleFile):
    """``safetensors`` ``save_file``; ``load_file`` with the pread backend, which materialises every tensor.

    The default mmap backend returns before reading anything, so timing it would measure nothing.
    """

    name: str
    filename: str = "model.safetensors"

    def knobs(self) -> dict[str, str]:
        return {"format": "safetensors, one file", "dtype": "model's", "load": "load_file(backend='pread')"}

    def write(self, tensors: Tensors, path: Path) -> None:
        # safetensors orders tensors its own way; the mapping's order travels in the header.
        safetensors.torch.save_file(dict(tensors), path, metadata={_ORDER: json.dumps(list(tensors))})

    def read(self, path: Path) -> OrderedDict[str, torch.Tensor]:
        with safetensors.safe_open(path, framework="pt", backend="pread") as f:
            return OrderedDict((name, f.get_tensor(name)) for name in json.loads(f.metadata()[_ORDER]))


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """One process without a process group is this strategy's definition, not something to warn about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


@dataclass(frozen=True)
class DistributedCheckpoint(Strategy):
    """``torch.distributed.checkpoint`` in one process: a FileSystemWriter with several threads, one file each."""

    name: str
    threads: int = 4

    def knobs(self) -> dict[str, str]:
        return {
            "format": f"torch.distributed.checkpoint, {self.threads} files",
            "dtype": "model's",
            "load": "dcp.load into tensors allocated from its metadata",
        }

    def save(self, tensors: Tensors, directory: Path, progress: Progress) -> None:
        with _single_process():
            dcp.save(dict(tensors), storage_writer=dcp.FileSystemWriter(directory, thread_count=self.threads))
        progress(total_bytes(tensors))

    def load(self, directory: Path, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        try:
            reader = dcp.FileSystemReader(directory)
            metadata = reader.read_metadata().state_dict_metadata
            tensors = OrderedDict((k, torch.empty(m.size, dtype=m.properties.dtype)) for k, m in metadata.items())
            with _single_process():
                dcp.load(tensors, storage_reader=reader)
        except Exception as err:  # dcp wraps failures in CheckpointException, missing files in FileNotFoundError
            raise CheckpointError(f"{directory}: unreadable distributed checkpoint: {err}") from err
        progress(total_bytes(tensors))
        return tensors

    def estimate_bytes(self, tensors: Tensors) -> int:
        return total_bytes(tensors) + len(tensors) * 4096 + MiB


@dataclass(frozen=True)
class TensorStoreOptions:
    """The knobs of the TensorStore writer; the defaults are the study's unoptimised baseline."""

    dtype: Literal["float32", "float16"] = "float32"
    """On-disk dtype for every tensor it holds exactly; a tensor it cannot hold keeps its own."""
    chunk_bytes: int | None = None
    """Chunk size target (T5X's divisor rule); None is the study's 64 elements per dimension."""
    concurrency: int | None = None
    """``file_io_concurrency`` limit; None keeps TensorStore's default (cores, at least 4)."""
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

    def disk_dtype(self, dtype: torch.dtype) -> torch.dtype:
        wanted = getattr(torch, self.dtype)
        return wanted if torch.promote_types(dtype, wanted) == wanted else dtype

    def chunk_shape(self, shape: tuple[int, ...], itemsize: int) -> list[int]:
        if self.chunk_bytes is None:
            return [max(1, min(64, d)) for d in shape]
        return divisor_chunks(shape, max(1, self.chunk_bytes // itemsize))

    def context(self) -> ts.Context:
        spec: dict = {} if self.concurrency is None else {"file_io_concurrency": {"limit": self.concurrency}}
        if not self.sync:
            spec["file_io_sync"] = False
        return ts.Context(spec)

    def metadata(self, shape: list[int], disk: torch.dtype) -> dict:
        chunks = self.chunk_shape(tuple(shape), disk.itemsize)
        if self.format == "zarr":
            compressor = None if self.compression is None else {"id": self.compression}
            return {"shape": shape, "chunks": chunks, "dtype": _ZARR_DTYPES[disk], "compressor": compressor}
        inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if self.compression is not None:
            inner.append({"name": self.compression})
        shard = [-(-max(1, d) // c) * c for d, c in zip(shape, chunks, strict=True)]
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

    def kvstore(self, directory: Path, key: str) -> dict:
        root = directory.resolve()
        if self.driver == "ocdbt":
            return {"driver": "ocdbt", "base": f"file://{root}/", "path": f"{key}/"}
        return {"driver": "file", "path": f"{root}/{key}/"}

    def describe(self) -> dict[str, str]:
        chunks = "64 per dim" if self.chunk_bytes is None else f"<= {self.chunk_bytes / MiB:g} MiB (T5X rule)"
        return {
            "format": "zarr v2, one array per tensor" if self.format == "zarr" else "zarr v3, one shard per tensor",
            "dtype": self.dtype if self.dtype == "float32" else f"{self.dtype} (wider tensors keep theirs)",
            "chunks": chunks,
            "file_io_concurrency": "default" if self.concurrency is None else str(self.concurrency),
            "compression": self.compression or "none",
            "kvstore": self.driver,
            "file_io_sync": "on" if self.sync else "off",
            "in flight": "one tensor" if not self.inflight_bytes else f"<= {self.inflight_bytes / MiB:g} MiB",
        }


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


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy view; bfloat16 goes through its bits because numpy has no bfloat16 of its own."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _ts_dtype(dtype: torch.dtype) -> ts.dtype:
    return ts.bfloat16 if dtype == torch.bfloat16 else ts.dtype(str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class TensorStore(Strategy):
    """One zarr array per tensor, written and read one after another as the study did."""

    name: str
    options: TensorStoreOptions

    def knobs(self) -> dict[str, str]:
        return self.options.describe()

    def _spec(self, directory: Path, name: str) -> dict:
        return {"driver": self.options.format, "kvstore": self.options.kvstore(directory, name)}

    def _pipeline(
        self, directory: Path, jobs: Iterable[tuple[str, int, Callable[[], Any]]], progress: Progress
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

    def save(self, tensors: Tensors, directory: Path, progress: Progress) -> None:
        context = self.options.context()

        def write(name: str, tensor: torch.Tensor) -> Callable[[], Any]:
            def start() -> Any:
                metadata = self.options.metadata(list(tensor.shape), self.options.disk_dtype(tensor.dtype))
                spec = {**self._spec(directory, name), "metadata": metadata}
                return ts.open(spec, create=True, context=context).result().write(_to_numpy(tensor))

            return start

        jobs = ((name, nbytes(tensor), write(name, tensor)) for name, tensor in tensors.items())
        self._pipeline(directory, jobs, progress)
        entries = [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype)} for n, t in tensors.items()]
        manifest = {"format": _MANIFEST_FORMAT, "strategy": self.name, "options": asdict(self.options)}
        (directory / _MANIFEST).write_text(json.dumps({**manifest, "tensors": entries}, indent=1))

    def _manifest(self, directory: Path) -> list[dict]:
        path = directory / _MANIFEST
        if not path.is_file():
            raise CheckpointError(f"{directory}: no {_MANIFEST}; not a complete TensorStore checkpoint")
        try:
            manifest = json.loads(path.read_text())
            written = manifest["options"]
            if manifest["format"] != _MANIFEST_FORMAT or (written["driver"], written.get("format", "zarr")) != (
                self.options.driver,
                self.options.format,
            ):
                raise CheckpointError(f"{path}: written as {manifest['format']} by {manifest['strategy']}")
            return manifest["tensors"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: malformed manifest: {err!r}") from err

    def load(self, directory: Path, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        context = self.options.context()
        try:
            entries = [(e["name"], _TORCH_DTYPES[e["dtype"]], list(e["shape"])) for e in self._manifest(directory)]
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{directory}: malformed manifest entry: {err!r}") from err

        def read(name: str, dtype: torch.dtype, shape: list[int]) -> Callable[[], Any]:
            def start() -> Any:
                array = ts.open({**self._spec(directory, name), "open": True}, context=context).result()
                if list(array.shape) != shape:
                    raise CheckpointError(f"{directory}: tensor {name} has shape {array.shape}, expected {shape}")
                return ts.cast(array, _ts_dtype(dtype)).read()

            return start

        jobs = ((n, math.prod(s) * d.itemsize, read(n, d, s)) for n, d, s in entries)
        arrays = self._pipeline(directory, jobs, progress)
        return OrderedDict((name, _from_numpy(a)) for (name, _, _), a in zip(entries, arrays, strict=True))

    def estimate_bytes(self, tensors: Tensors) -> int:
        total = 0
        for tensor in tensors.values():
            itemsize = self.options.disk_dtype(tensor.dtype).itemsize
            chunks = self.options.chunk_shape(tuple(tensor.shape), itemsize)
            count = math.prod(math.ceil(d / c) for d, c in zip(tensor.shape, chunks, strict=True))
            chunk_nbytes = math.prod(chunks) * itemsize
            if self.options.format == "zarr3":
                total += _round_up(count * (chunk_nbytes + _SHARD_INDEX_ENTRY) + _BLOCK)
            elif self.options.driver == "file":
                total += count * _round_up(chunk_nbytes)
            else:
                total += count * chunk_nbytes
        if self.options.driver == "ocdbt":
            # Each tensor is its own OCDBT commit, which adds B-tree and version nodes never collected.
            total = total * 5 // 4 + len(tensors) * _OCDBT_COMMIT_BYTES
        return int(total * 1.02) + MiB


def _round_up(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


_STUDY = TensorStoreOptions()
BEST = TensorStoreOptions(dtype="float16", chunk_bytes=1 * MiB, concurrency=128, inflight_bytes=1 << 30)
"""The sweep's winner (median save + cold load) on this project's machine, openllama-3b-2l, 2026-11-29:
32 configurations of chunk size, dtype, per-file fsync, bytes in flight and I/O concurrency."""
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        TorchSave("pytorch"),
        TensorStore("tensorstore", _STUDY),
        TensorStore("t5x", replace(_STUDY, chunk_bytes=64 * MiB, concurrency=128, compression="gzip")),
        TensorStore("ts+concurrency", replace(_STUDY, concurrency=128)),
        TensorStore("ts+chunks", replace(_STUDY, chunk_bytes=1 * MiB)),
        TensorStore("ts+compression", replace(_STUDY, compression="gzip")),
        TensorStore("ts+float16", replace(_STUDY, dtype="float16")),
        TensorStore("ts+ocdbt", replace(_STUDY, driver="ocdbt")),
        TorchSave("pytorch+mmap", mmap=True),
        SafeTensors("safetensors"),
        DistributedCheckpoint("dcp"),
        TensorStore("ts+zarr3", replace(_STUDY, format="zarr3")),
        TensorStore("ts+zstd", replace(_STUDY, compression="zstd")),
        TensorStore("ts+nosync", replace(_STUDY, sync=False)),
        TensorStore("ts+best", BEST),
    )
}
EIGHT_WAY: tuple[str, ...] = (
    "pytorch",
    "tensorstore",
    "t5x",
    "ts+concurrency",
    "ts+chunks",
    "ts+compression",
    "ts+float16",
    "ts+ocdbt",
)
"""The study's eight approaches, in its order."""
BASELINE = "tensorstore"


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownChoiceError("strategy", name, list(STRATEGIES)) from None


def parse_strategies(spec: str) -> list[str]:
    """``all`` (the eight), ``every`` (the whole registry) or a comma list of names, validated up front."""
    if spec.strip() == "all":
        return list(EIGHT_WAY)
    if spec.strip() == "every":
        return list(STRATEGIES)
    names = [part.strip() for part in spec.split(",") if part.strip()]
    for name in names:
        get_strategy(name)
    if not names:
        raise UnknownChoiceError("strategy", spec, list(STRATEGIES))
    return names
