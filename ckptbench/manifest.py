"""The manifest: the last file of every checkpoint, naming each tensor's dtype, shape and digest.

Strategies write only their library's own files; ``checkpoint`` adds ``ckptbench.json`` after them,
so its presence is the commit marker and every loader refuses a directory without it. Its
per-tensor digests (xxh3, from the tensors in memory, computed outside any timer) let ``verify``
find damage long after the run, without a reference copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from .errors import CheckpointError

if TYPE_CHECKING:
    from .location import Location

MANIFEST = "ckptbench.json"
FORMAT = "ckptbench-checkpoint/1"
DIGEST = "xxh3_64"
SEAL = "manifest_digest"
"""xxh3 of the manifest's other members: an edited or cut manifest no longer matches it. Manifests written
before it existed have none and stay readable (``Manifest.sealed`` is then False)."""


class ManifestError(CheckpointError):
    """A manifest that is there but damaged: unparsable, or not matching its own digest."""


def _seal(body: dict[str, Any]) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def digest(tensor: torch.Tensor) -> str:
    """xxh3 of the tensor's raw bytes (it releases the GIL, so tensors hash in parallel)."""
    data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
    return xxhash.xxh3_64_hexdigest(data)


def digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return dict(zip(tensors, pool.map(digest, tensors.values()), strict=True))


@dataclass(frozen=True)
class Entry:
    """One tensor as saved: what a loader must return for it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"tensor {self.name}: unknown dtype {self.dtype!r} in the manifest")
        return dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * self.torch_dtype.itemsize


Layout = tuple[Entry, ...]


def layout(tensors: Mapping[str, torch.Tensor], tensor_digests: Mapping[str, str]) -> Layout:
    return tuple(
        Entry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), tensor_digests[name])
        for name, t in tensors.items()
    )


@dataclass(frozen=True)
class Manifest:
    strategy: str
    config: dict[str, Any]
    tensors: Layout
    structure: dict[str, Any] | None = None
    """How the tensors nest into a training state (``pytree``); None for a flat mapping of weights."""
    sealed: bool = True
    """Whether the file carried its own digest (older checkpoints' manifests do not)."""

    def write(self, directory: Location) -> None:
        """Written last, as a file that exists only once complete (a disk renames it into place; a bucket PUTs it)."""
        body = {
            "format": FORMAT,
            "strategy": self.strategy,
            "config": self.config,
            "digest": DIGEST,
            "tensors": [asdict(e) for e in self.tensors],
            **({} if self.structure is None else {"structure": self.structure}),
        }
        body[SEAL] = _seal(body)
        directory.put_text(MANIFEST, json.dumps(body, indent=1))

    @classmethod
    def read(cls, directory: Location) -> Manifest:
        path = directory.where(MANIFEST)
        try:
            if (absent := directory.absent()) is not None:
                raise CheckpointError(f"{directory}: {absent}")
            text = directory.get_text(MANIFEST)
            if text is None:
                raise CheckpointError(f"{directory}: no {MANIFEST}; not a complete ckptbench checkpoint")
            body = json.loads(text)
            sealed = SEAL in body
            if sealed and (found := _seal({k: v for k, v in body.items() if k != SEAL})) != body[SEAL]:
                raise ManifestError(
                    f"{path}: the manifest's digest {found} differs from the {body[SEAL]} it was written with: "
                    "it was edited or cut"
                )
            if body["format"] != FORMAT or body["digest"] != DIGEST:
                raise CheckpointError(f"{path}: format {body['format']!r}, digest {body['digest']!r} not understood")
            entries = tuple(
                Entry(e["name"], e["dtype"], tuple(int(d) for d in e["shape"]), e["digest"]) for e in body["tensors"]
            )
            for entry in entries:
                entry.torch_dtype  # noqa: B018 - refuses an unknown dtype here, not halfway through a load
            return cls(body["strategy"], dict(body["config"]), entries, body.get("structure"), sealed)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{path}: malformed manifest: {err!r}") from err


def check_loaded(loaded: Mapping[str, torch.Tensor], entries: Layout, source: str) -> None:
    """Refuse a load that lost a tensor or changed a dtype or a shape: cheap, so it runs inside every load."""
    if list(loaded) != [e.name for e in entries]:
        missing = [e.name for e in entries if e.name not in loaded][:5]
        extra = [n for n in loaded if n not in {e.name for e in entries}][:5]
        raise CheckpointError(f"{source}: tensors differ from the manifest (missing {missing}, unexpected {extra})")
    for entry in entries:
        tensor = loaded[entry.name]
        if tensor.dtype != entry.torch_dtype or tuple(tensor.shape) != entry.shape:
            raise CheckpointError(
                f"{source}: tensor {entry.name} loaded as {tensor.dtype} {tuple(tensor.shape)}, "
                f"saved as {entry.dtype} {entry.shape}"
            )


def problem(entry: Entry, got: torch.Tensor | Exception) -> str | None:
    """What is wrong with a tensor read back for ``entry``, or None when it is what was saved."""
    if isinstance(got, Exception):
        return f"unreadable: {got}"
    if got.dtype != entry.torch_dtype or tuple(got.shape) != entry.shape:
        return f"is {got.dtype} {tuple(got.shape)}, saved as {entry.dtype} {entry.shape}"
    found = digest(got)
    if found != entry.digest:
        return f"digest {found} differs from the saved {entry.digest}: its bytes changed"
    return None
