"""How a checkpoint is written and read: one class per library, one registry entry per approach.

Every TensorStore approach is the same writer/reader with different ``TensorStoreOptions``, so an
ablation differs from the baseline in exactly the field it names. Strategies write into a
directory they are given and never sync: the harness makes every save durable the same way.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import ml_dtypes
import numpy as np
import tensorstore as ts
import torch

from .errors import CheckpointError, UnknownChoiceError

Tensors = Mapping[str, torch.Tensor]
Progress = Callable[[int], None]
"""Called with the number of bytes of model data just written or read."""

MiB = 1 << 20
_BLOCK = 4096
_OCDBT_COMMIT_BYTES = 256 << 10
_MANIFEST = "manifest.json"
_MANIFEST_FORMAT = "ckptbench-tensorstore/1"
_ZARR_DTYPES = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "bfloat16", torch.float64: "<f8"}
_TORCH_DTYPES = {str(dtype): dtype for dtype in _ZARR_DTYPES}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


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


@dataclass(frozen=True)
class TorchSave(Strategy):
    """``torch.save`` of the whole mapping to one file; ``torch.load(weights_only=True)``."""

    name: str
    filename: str = "model.pt"

    def knobs(self) -> dict[str, str]:
        return {"format": "torch.save zip, one file", "dtype": "model's", "load": "torch.load(weights_only=True)"}

    def save(self, tensors: Tensors, directory: Path, progress: Progress) -> None:
        torch.save(OrderedDict(tensors), directory / self.filename)
        progress(sum(_nbytes(t) for t in tensors.values()))

    def load(self, directory: Path, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        path = directory / self.filename
        if not path.is_file():
            raise CheckpointError(f"{directory}: no {self.filename}; not a complete {self.name} checkpoint")
        try:
            tensors = torch.load(path, weights_only=True)
        except Exception as err:  # torch raises bare RuntimeError/EOFError/pickle errors for damaged files
            raise CheckpointError(f"{path}: unreadable torch checkpoint: {err}") from err
        progress(sum(_nbytes(t) for t in tensors.values()))
        return tensors

    def estimate_bytes(self, tensors: Tensors) -> int:
        return sum(_nbytes(t) for t in tensors.values()) + MiB


@dataclass(frozen=True)
class TensorStoreOptions:
    """The knobs of the TensorStore writer; the defaults are the study's unoptimised baseline."""

    dtype: Literal["float32", "float16"] = "float32"
    """On-disk dtype for every tensor it holds exactly; a tensor it cannot hold keeps its own."""
    chunk_bytes: int | None = None
    """Chunk size target (T5X's divisor rule); None is the study's 64 elements per dimension."""
    concurrency: int | None = None
    """``file_io_concurrency`` limit; None keeps TensorStore's default (cores, at least 4)."""
    compression: Literal["gzip"] | None = None
    """zarr v2 compressor id; None writes raw chunks (TensorStore would otherwise use blosc)."""
    driver: Literal["file", "ocdbt"] = "file"
    """The kvstore under zarr: plain files, or OCDBT packing chunks into a few data files."""

    def disk_dtype(self, dtype: torch.dtype) -> torch.dtype:
        wanted = getattr(torch, self.dtype)
        return wanted if torch.promote_types(dtype, wanted) == wanted else dtype

    def chunk_shape(self, shape: tuple[int, ...], itemsize: int) -> list[int]:
        if self.chunk_bytes is None:
            return [max(1, min(64, d)) for d in shape]
        return divisor_chunks(shape, max(1, self.chunk_bytes // itemsize))

    def context(self) -> ts.Context:
        spec = {} if self.concurrency is None else {"file_io_concurrency": {"limit": self.concurrency}}
        return ts.Context(spec)

    def kvstore(self, directory: Path, key: str) -> dict:
        root = directory.resolve()
        if self.driver == "ocdbt":
            return {"driver": "ocdbt", "base": f"file://{root}/", "path": f"{key}/"}
        return {"driver": "file", "path": f"{root}/{key}/"}

    def describe(self) -> dict[str, str]:
        chunks = "64 per dim" if self.chunk_bytes is None else f"<= {self.chunk_bytes / MiB:g} MiB (T5X rule)"
        return {
            "format": "zarr v2, one array per tensor",
            "dtype": self.dtype if self.dtype == "float32" else f"{self.dtype} (wider tensors keep theirs)",
            "chunks": chunks,
            "file_io_concurrency": "default" if self.concurrency is None else str(self.concurrency),
            "compression": self.compression or "none",
            "kvstore": self.driver,
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

    def _array_spec(self, directory: Path, name: str, tensor: torch.Tensor) -> dict:
        disk = self.options.disk_dtype(tensor.dtype)
        shape = list(tensor.shape)
        return {
            "driver": "zarr",
            "kvstore": self.options.kvstore(directory, name),
            "metadata": {
                "shape": shape,
                "chunks": self.options.chunk_shape(tuple(shape), disk.itemsize),
                "dtype": _ZARR_DTYPES[disk],
                "compressor": None if self.options.compression is None else {"id": self.options.compression},
            },
        }

    def save(self, tensors: Tensors, directory: Path, progress: Progress) -> None:
        context = self.options.context()
        entries = []
        for name, tensor in tensors.items():
            spec = self._array_spec(directory, name, tensor)
            array = ts.open(spec, create=True, context=context).result()
            array.write(_to_numpy(tensor)).result()
            entries.append({"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype)})
            progress(_nbytes(tensor))
        manifest = {"format": _MANIFEST_FORMAT, "strategy": self.name, "options": asdict(self.options)}
        (directory / _MANIFEST).write_text(json.dumps({**manifest, "tensors": entries}, indent=1))

    def _manifest(self, directory: Path) -> list[dict]:
        path = directory / _MANIFEST
        if not path.is_file():
            raise CheckpointError(f"{directory}: no {_MANIFEST}; not a complete TensorStore checkpoint")
        try:
            manifest = json.loads(path.read_text())
            if manifest["format"] != _MANIFEST_FORMAT or manifest["options"]["driver"] != self.options.driver:
                raise CheckpointError(f"{path}: written as {manifest['format']} by {manifest['strategy']}")
            return manifest["tensors"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: malformed manifest: {err!r}") from err

    def load(self, directory: Path, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        context = self.options.context()
        tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
        for entry in self._manifest(directory):
            try:
                name, dtype, shape = entry["name"], _TORCH_DTYPES[entry["dtype"]], entry["shape"]
            except (KeyError, TypeError) as err:
                raise CheckpointError(f"{directory}: malformed manifest entry {entry!r}") from err
            spec = {"driver": "zarr", "kvstore": self.options.kvstore(directory, name), "open": True}
            try:
                array = ts.open(spec, context=context).result()
                if list(array.shape) != shape:
                    raise CheckpointError(f"{directory}: tensor {name} has shape {array.shape}, expected {shape}")
                tensor = _from_numpy(ts.cast(array, _ts_dtype(dtype)).read().result())
            except ValueError as err:
                raise CheckpointError(f"{directory}: tensor {name}: {err}") from err
            tensors[name] = tensor
            progress(_nbytes(tensor))
        return tensors

    def estimate_bytes(self, tensors: Tensors) -> int:
        total = 0
        for tensor in tensors.values():
            itemsize = self.options.disk_dtype(tensor.dtype).itemsize
            chunks = self.options.chunk_shape(tuple(tensor.shape), itemsize)
            count = math.prod(math.ceil(d / c) for d, c in zip(tensor.shape, chunks, strict=True))
            chunk_nbytes = math.prod(chunks) * itemsize
            if self.options.driver == "file":
                chunk_nbytes = -(-chunk_nbytes // _BLOCK) * _BLOCK
            total += count * chunk_nbytes
        if self.options.driver == "ocdbt":
            # Each tensor is its own OCDBT commit, which adds B-tree and version nodes never collected.
            total = total * 5 // 4 + len(tensors) * _OCDBT_COMMIT_BYTES
        return int(total * 1.02) + MiB


_STUDY = TensorStoreOptions()
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
    """``all`` (the eight), or a comma-separated list of registry names, validated up front."""
    if spec.strip() == "all":
        return list(EIGHT_WAY)
    names = [part.strip() for part in spec.split(",") if part.strip()]
    for name in names:
        get_strategy(name)
    if not names:
        raise UnknownChoiceError("strategy", spec, list(STRATEGIES))
    return names
