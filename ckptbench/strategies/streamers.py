"""The fast loaders people pick when load time matters: Run:ai Model Streamer, fastsafetensors, tensorizer.

Each is measured as its users run it, with the library's own defaults. The first two read safetensors
(written by the same writer as the ``safetensors`` strategy), tensorizer its own format. Every load hands
the caller tensors it owns: the streamers give their buffers away (``owned=True``; fastsafetensors' tensors
keep their buffer alive), so they stay valid after the loader closes and no copy is added to the timed load.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from fastsafetensors import fastsafe_open
from runai_model_streamer import SafetensorsStreamer
from tensorizer import TensorDeserializer, TensorSerializer

from ..errors import CheckpointError
from ..location import Location
from ..manifest import Layout
from .base import Progress, SingleFile, Tensors
from .pytorch import SafeTensors

_SAFETENSORS = SafeTensors("safetensors")


def _in_order(found: dict[str, torch.Tensor], entries: Layout) -> OrderedDict[str, torch.Tensor]:
    """The manifest's order (loaders yield in file or completion order); a tensor not in the file is named."""
    missing = [e.name for e in entries if e.name not in found]
    if missing:
        raise CheckpointError(f"{len(missing)} tensors not in the file, first {missing[0]}")
    return OrderedDict((e.name, found[e.name]) for e in entries)


class _LocalSafetensors(SingleFile):
    """A loader of local safetensors files; the file is written exactly as the ``safetensors`` strategy writes it."""

    filename = "model.safetensors"

    def unsupported(self, store: str) -> str | None:
        return None if store == "file" else f"{self.name} is measured on local files here"

    def write(self, tensors: Tensors, target: Path | BinaryIO) -> None:
        _SAFETENSORS.write(tensors, target)


@dataclass(frozen=True)
class RunaiStreamer(_LocalSafetensors):
    """Run:ai Model Streamer: C++ threads read the file in blocks; its tensors are handed over (``owned=True``)."""

    name: str

    def config(self) -> dict[str, Any]:
        return {"library": "runai-model-streamer", "format": "safetensors"}

    def knobs(self) -> dict[str, str]:
        return {
            "format": "safetensors, one file",
            "dtype": "model's",
            "load": "SafetensorsStreamer.stream_file (library defaults: 16 threads), tensors owned by the caller",
        }

    def read(self, source: Path | BinaryIO, entries: Layout) -> OrderedDict[str, torch.Tensor]:
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(str(source), owned=True)
            return _in_order(dict(streamer.get_tensors()), entries)

    def load_into(self, directory: Location, entries: Layout, into: Tensors, progress: Progress) -> None:
        """Each tensor copied out of the streamer's reused buffers (``owned=False``) as it arrives: no model copy."""
        wanted = {e.name for e in entries}

        def stream(source: Path | BinaryIO) -> None:
            with SafetensorsStreamer() as streamer:
                streamer.stream_file(str(source), owned=False)
                for name, tensor in streamer.get_tensors():
                    if name in wanted:
                        into[name].copy_(tensor)
                        wanted.discard(name)
                        progress(tensor.numel() * tensor.element_size())

        self.read_file(directory, stream)
        if wanted:
            where = directory.where(self.filename)
            raise CheckpointError(f"{where}: {len(wanted)} tensors not in the file, first {sorted(wanted)[0]}")


@dataclass(frozen=True)
class FastSafetensors(_LocalSafetensors):
    """fastsafetensors on CPU (``nogds=True``): the file read into one buffer; its tensors keep that buffer alive."""

    name: str

    def config(self) -> dict[str, Any]:
        return {"library": "fastsafetensors", "format": "safetensors", "nogds": True}

    def knobs(self) -> dict[str, str]:
        return {
            "format": "safetensors, one file",
            "dtype": "model's",
            "load": "fastsafe_open(nogds=True, device='cpu').get_tensor (views of its one buffer, kept alive)",
        }

    def read(self, source: Path | BinaryIO, entries: Layout) -> OrderedDict[str, torch.Tensor]:
        with fastsafe_open(filenames=[str(source)], nogds=True, device="cpu") as loader:
            names = set(loader.keys())
            return _in_order({e.name: loader.get_tensor(e.name) for e in entries if e.name in names}, entries)


@dataclass(frozen=True)
class Tensorizer(SingleFile):
    """CoreWeave's tensorizer: its own format (a header, then each tensor's metadata and bytes), read by threads."""

    name: str
    filename: str = "model.tensors"

    def config(self) -> dict[str, Any]:
        return {"library": "tensorizer", "format": "tensorizer"}

    def knobs(self) -> dict[str, str]:
        return {
            "format": "tensorizer, one file",
            "dtype": "model's",
            "load": "TensorDeserializer(device='cpu') (library defaults: readers chosen by the library)",
        }

    def unsupported(self, store: str) -> str | None:
        return None if store == "file" else f"{self.name} is measured on local files here"

    def write(self, tensors: Tensors, target: Path | BinaryIO) -> None:
        serializer = TensorSerializer(str(target) if isinstance(target, Path) else target)
        try:
            serializer.write_state_dict(dict(tensors))
        finally:
            serializer.close()

    def read(self, source: Path | BinaryIO, entries: Layout) -> OrderedDict[str, torch.Tensor]:
        with TensorDeserializer(str(source) if isinstance(source, Path) else source, device="cpu") as tensors:
            return _in_order(dict(tensors), entries)
