"""A complete checkpoint: a strategy's files plus the manifest, saved, loaded and verified as one.

Every save goes through ``save`` (library errors wrapped, a full disk named as such, committed with
the manifest last), every load through ``load`` (refused without the manifest, checked against it), and
``verify`` re-reads any checkpoint ckptbench wrote and names each damaged tensor.
"""

from __future__ import annotations

import errno
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, CkptbenchError, DiskFullError, gigabytes
from .location import Location, Staging
from .manifest import MANIFEST, Layout, Manifest, ManifestError, check_loaded, problem
from .pytree import structure_of
from .storage import location
from .strategies import Progress, Strategy, Tensors, from_config, get_strategy

_NEARLY_FULL = 16 << 20


def _disk_full(err: BaseException, directory: Location) -> bool:
    """ENOSPC anywhere in the chain, or a write that failed on a (nearly) full filesystem.

    Libraries report a full disk their own way (torch.save: "unexpected pos"; TensorStore: an
    internal error naming the file), so the filesystem's state is the reliable witness.
    """
    chain: BaseException | None = err
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    space = directory.space()
    return space is not None and space[1] < _NEARLY_FULL


def save(strategy: Strategy, tensors: Tensors, layout: Layout, staging: Staging, progress: Progress) -> float | None:
    """Write ``tensors`` with ``strategy`` where ``staging`` stages them, then commit: the manifest last.

    For an asynchronous save, returns the seconds until the strategy gave control back (the stall
    training would see; the save is then waited for); None for a synchronous one, whose caller waits
    for all of it.
    """
    directory = staging.partial
    try:
        started = time.perf_counter()
        pending = strategy.save(tensors, directory, progress)
        blocking = time.perf_counter() - started
        if pending is not None:
            pending()
        staging.commit(Manifest(strategy.name, strategy.config(), layout, structure_of(tensors)))
        return None if pending is None else blocking
    except Exception as err:  # each library raises its own types for I/O failures; strategies wrap some
        if _disk_full(err, directory):
            where, free_bytes = directory.space()
            need, free = gigabytes(strategy.estimate_bytes(tensors), free_bytes)
            raise DiskFullError(
                f"disk full under {where} during the {strategy.name} save: it needs about "
                f"{need} GB; {free} GB are free now "
                f"that its partial files are written (they are removed)"
            ) from err
        if isinstance(err, CkptbenchError):
            raise
        raise CheckpointError(f"{directory}: {strategy.name} save failed: {type(err).__name__}: {err}") from err


def load(
    strategy: Strategy, where: Location | Path, progress: Progress, into: Tensors | None = None
) -> OrderedDict[str, torch.Tensor]:
    """Every tensor, as the manifest describes it, in fresh memory or read ``into`` existing tensors.

    Refuses an incomplete checkpoint, one of another format, and existing tensors that do not match it.
    """
    directory = location(where)
    manifest = Manifest.read(directory)
    if not strategy.reads(manifest.config):
        raise CheckpointError(
            f"{directory}: written as {manifest.config.get('library')} {manifest.config.get('format', '')} "
            f"by {manifest.strategy}; {strategy.name} reads another format"
        )
    if into is not None:
        check_loaded(into, manifest.tensors, f"the tensors to load {directory} into")
    try:
        if into is None:
            tensors = strategy.load(directory, manifest.tensors, progress)
        else:
            strategy.load_into(directory, manifest.tensors, into, progress)
            tensors = OrderedDict(into)
    except CkptbenchError:
        raise
    except Exception as err:
        raise CheckpointError(f"{directory}: {strategy.name} load failed: {type(err).__name__}: {err}") from err
    check_loaded(tensors, manifest.tensors, str(directory))
    return tensors


@dataclass(frozen=True)
class Damage:
    tensor: str
    problem: str


@dataclass(frozen=True)
class Verification:
    """What ``verify`` found: the checkpoint's writer and every damaged tensor (none when intact)."""

    path: Location
    strategy: str
    tensors: int
    damage: tuple[Damage, ...]
    sealed: bool = True
    """Whether the manifest carried its own digest; older checkpoints' do not (they are still verified)."""

    @property
    def intact(self) -> bool:
        return not self.damage


def verify(path: str | Path | Location, strategy: str | None = None) -> Verification:
    """Re-read a checkpoint tensor by tensor and check each against its manifest (dtype, shape, digest).

    The strategy comes from the manifest (rebuilt from its stored configuration) unless named.
    Raises ``CheckpointError`` when ``path`` is not a complete ckptbench checkpoint at all.
    """
    directory = location(path)
    try:
        manifest = Manifest.read(directory)
    except ManifestError as err:
        return Verification(directory, "unknown", 0, (Damage(MANIFEST, str(err)),))
    reader = get_strategy(strategy) if strategy else from_config(manifest.strategy, manifest.config)
    if not reader.reads(manifest.config):
        raise CheckpointError(f"{directory}: written by {manifest.strategy}; {reader.name} reads another format")
    damage = (*_unnamed(reader, directory, manifest), *_damage(reader.load_each(directory, manifest.tensors)))
    return Verification(directory, manifest.strategy, len(manifest.tensors), damage, manifest.sealed)


def _unnamed(reader: Strategy, directory: Location, manifest: Manifest) -> Iterator[Damage]:
    """The manifest against the format's own index: every tensor the data holds must be named in it.

    Checked for a mapping of weights; a nested training state is keyed in each format its own way."""
    if manifest.structure is not None:
        return
    try:
        stored = reader.stored_names(directory)
    except Exception:  # an unreadable index: the tensors' own reads say what is wrong
        return
    named = {e.name for e in manifest.tensors}
    if stored is not None and not stored <= named:
        extra = sorted(stored - named)
        yield Damage(
            MANIFEST,
            f"names {len(named)} tensors but the {reader.name} data holds {len(stored)}: {len(extra)} unnamed "
            f"(e.g. {', '.join(extra[:3])}): the manifest was cut or edited",
        )


def _damage(tensors: Iterator) -> Iterator[Damage]:
    for entry, got in tensors:
        found = problem(entry, got)
        if found is not None:
            yield Damage(entry.name, found)
