"""Strategies across several processes: every rank writes and reads its own rows of every tensor.

Each registered strategy has one or two sharded forms (``forms``), derived from it, never registered
on their own. ``ckptbench.ranked`` calls a form's ``session`` on every rank of a phase outside the
timer (what the phase shares: a device mesh, a TensorStore context, OCDBT's coordinator), then
``save_shards`` or ``load_shards`` inside it. In one process a form is its base strategy, except
per-process OCDBT, whose layout is its own: ``verify`` and a plain load read any of them.
"""

from __future__ import annotations

import contextlib
import json
import math
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import tensorstore as ts
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .. import dcpstore
from ..errors import CheckpointError, UsageError
from ..location import Location
from ..manifest import Entry, Layout, layout
from ..shards import Ranks, block_rows, contiguous_stride, row_range
from .base import Progress, SingleFile, Strategy, Tensors, from_numpy, nbytes, to_numpy
from .pytorch import DistributedCheckpoint
from .zarr import TensorStore, _ts_dtype, array_names

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _local_shape(entry: Entry, ranks: Ranks) -> tuple[int, ...]:
    lo, hi = ranks.rows(entry.shape[0])
    return (hi - lo, *entry.shape[1:])


def _rows_only(rows: int, entry: Entry) -> tuple[int, ...]:
    return (rows, *entry.shape[1:])


@dataclass(frozen=True)
class Sharded(Strategy):
    """A strategy's form for ranks that each hold ``Shard(0)`` of every tensor (``torch.chunk``'s rows)."""

    name: str
    base: Strategy
    form: ClassVar[str]
    """How the ranks share the work, as stored in ``config()`` (``sharded``)."""
    how: ClassVar[str]
    """The same in words, for the knobs."""

    def config(self) -> dict[str, Any]:
        return {**self.base.config(), "sharded": self.form}

    def knobs(self) -> dict[str, str]:
        return {**self.base.knobs(), "ranks": self.how}

    def reads(self, config: dict[str, Any]) -> bool:
        return config.get("sharded") == self.form and self.base.reads(config)

    def unsupported(self, store: str) -> str | None:
        return self.base.unsupported(store)

    def save(self, tensors: Tensors, directory: Location, progress: Progress) -> None:
        self.base.save(tensors, directory, progress)

    def load(self, directory: Location, entries: Layout, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        return self.base.load(directory, entries, progress)

    def load_each(self, directory: Location, entries: Layout) -> Iterator[tuple[Entry, torch.Tensor | Exception]]:
        return self.base.load_each(directory, entries)

    def stored_names(self, directory: Location) -> set[str] | None:
        return self.base.stored_names(directory)

    def estimate_bytes(self, tensors: Tensors) -> int:
        return self.base.estimate_bytes(tensors)

    @contextlib.contextmanager
    def session(self, ranks: Ranks, writing: bool) -> Iterator[Any]:
        """What every rank's save (``writing``) or load of one phase shares, set up outside the timer."""
        yield None

    @abstractmethod
    def save_shards(self, session: Any, shards: Tensors, entries: Layout, directory: Location, ranks: Ranks) -> None:
        """Write this rank's rows of every tensor of ``entries`` (``shards``, by name) into ``directory``."""

    @abstractmethod
    def load_shards(
        self, session: Any, directory: Location, entries: Layout, ranks: Ranks
    ) -> OrderedDict[str, torch.Tensor]:
        """This rank's rows of every tensor of ``entries``, in their order, in fresh memory."""


def _dcp(action: str, directory: Location, call: Any) -> None:
    try:
        call()
    except CheckpointException as err:  # a BaseException that names every rank's failure
        raise CheckpointError(f"{directory}: dcp {action} failed: {err}") from err


@dataclass(frozen=True)
class DTensorCheckpoint(Sharded):
    base: DistributedCheckpoint
    form: ClassVar[str] = "dtensor"
    how: ClassVar[str] = "DTensor Shard(0) on each rank; dcp.save/load over the ranks' group (DCP reshards by itself)"

    def unsupported(self, store: str) -> str | None:
        """With ranks, DCP also writes to a bucket: torch's own writer over the project's S3 client (``dcpstore``)."""
        return None if store == "s3" else self.base.unsupported(store)

    @contextlib.contextmanager
    def session(self, ranks: Ranks, writing: bool) -> Iterator[DeviceMesh]:
        yield DeviceMesh.from_group(ranks.group, "cpu")

    def _dtensors(self, local: Tensors, entries: Layout, mesh: DeviceMesh) -> dict[str, DTensor]:
        # Without shape and stride, from_local assumes even shards and gets uneven ones' global shape wrong.
        return {
            e.name: DTensor.from_local(
                local[e.name],
                mesh,
                [Shard(0)],
                run_check=False,
                shape=torch.Size(e.shape),
                stride=contiguous_stride(e.shape),
            )
            for e in entries
        }

    def save_shards(
        self, session: DeviceMesh, shards: Tensors, entries: Layout, directory: Location, ranks: Ranks
    ) -> None:
        state = self._dtensors(shards, entries, session)
        writer = dcpstore.writer(directory, self.base.threads)
        _dcp("save", directory, lambda: dcp.save(state, storage_writer=writer, process_group=ranks.group))

    def load_shards(
        self, session: DeviceMesh, directory: Location, entries: Layout, ranks: Ranks
    ) -> OrderedDict[str, torch.Tensor]:
        local = OrderedDict((e.name, torch.empty(_local_shape(e, ranks), dtype=e.torch_dtype)) for e in entries)
        state = self._dtensors(local, entries, session)
        reader = dcpstore.reader(directory)
        _dcp("load", directory, lambda: dcp.load(state, storage_reader=reader, process_group=ranks.group))
        return OrderedDict((name, tensor.to_local()) for name, tensor in state.items())


@dataclass(frozen=True)
class Regions(Sharded):
    base: TensorStore
    form: ClassVar[str] = "regions"
    how: ClassVar[str] = (
        "rank 0 creates every array, chunk rows dividing each rank's rows (a zarr3 shard: one rank's rows); "
        "a barrier; each rank writes its rows, and reads its rows"
    )

    @contextlib.contextmanager
    def session(self, ranks: Ranks, writing: bool) -> Iterator[ts.Context]:
        yield self.base.options.context(data_copy_concurrency={"limit": ranks.threads})

    def _spec(self, directory: Location, name: str) -> dict:
        return {"driver": self.base.options.format, "kvstore": self.base.options.kvstore(directory, name)}

    def _create(self, context: ts.Context, entries: Layout, directory: Location, writers: int) -> None:
        options = self.base.options
        opening = [
            ts.open(
                {
                    **self._spec(directory, e.name),
                    "metadata": options.metadata(
                        list(e.shape), options.disk_dtype(e.torch_dtype), block_rows(e.shape[0], writers)
                    ),
                    "create": True,
                },
                context=context,
            )
            for e in entries
        ]
        for future in opening:
            future.result()

    def save_shards(
        self, session: ts.Context, shards: Tensors, entries: Layout, directory: Location, ranks: Ranks
    ) -> None:
        if ranks.rank == 0:
            self._create(session, entries, directory, ranks.size)
        ranks.barrier()

        def start(entry: Entry, lo: int, hi: int) -> Any:
            # A chunk equal to the fill value is written too, so a missing chunk always means damage.
            spec = {**self._spec(directory, entry.name), "open": True, "store_data_equal_to_fill_value": True}
            return ts.open(spec, context=session).result()[lo:hi].write(to_numpy(shards[entry.name]))

        jobs = []
        for e in entries:
            lo, hi = ranks.rows(e.shape[0])
            if hi > lo:
                jobs.append((e.name, nbytes(shards[e.name]), lambda e=e, lo=lo, hi=hi: start(e, lo, hi)))
        self.base._pipeline(directory, jobs, lambda n: None)

    def _read(self, context: ts.Context, directory: Location, entry: Entry, lo: int, hi: int) -> Any:
        spec = {**self._spec(directory, entry.name), "open": True, "fill_missing_data_reads": False}
        array = ts.open(spec, context=context).result()
        if tuple(array.shape) != entry.shape:
            raise CheckpointError(f"{directory}: tensor {entry.name} has shape {array.shape}, expected {entry.shape}")
        return ts.cast(array, _ts_dtype(entry.torch_dtype))[lo:hi].read()

    def load_shards(
        self, session: ts.Context, directory: Location, entries: Layout, ranks: Ranks
    ) -> OrderedDict[str, torch.Tensor]:
        jobs = []
        for e in entries:
            lo, hi = ranks.rows(e.shape[0])
            size = (hi - lo) * math.prod(e.shape[1:]) * e.torch_dtype.itemsize
            jobs.append((e.name, size, lambda e=e, lo=lo, hi=hi: self._read(session, directory, e, lo, hi)))
        arrays = self.base._pipeline(directory, jobs, lambda n: None)
        return OrderedDict((e.name, from_numpy(a)) for e, a in zip(entries, arrays, strict=True))


@dataclass(frozen=True)
class SharedOcdbt(Regions):
    """One OCDBT database for every rank: writers commit through TensorStore's coordinator on rank 0."""

    form: ClassVar[str] = "one database, coordinator"
    how: ClassVar[str] = (
        "one OCDBT database for all ranks: rank 0 creates every array and runs TensorStore's coordinator, "
        "each rank writes its rows through it and reads its rows"
    )

    @contextlib.contextmanager
    def session(self, ranks: Ranks, writing: bool) -> Iterator[ts.Context]:
        threads = {"data_copy_concurrency": {"limit": ranks.threads}}
        if not writing or ranks.size == 1:
            yield self.base.options.context(**threads)
            return
        server = None
        if ranks.rank == 0:
            bind = "127.0.0.1" if ranks.host in _LOOPBACK else "0.0.0.0"
            server = ts.ocdbt.DistributedCoordinatorServer({"bind_addresses": [f"{bind}:0"]})
        address = ranks.broadcast(None if server is None else f"{ranks.host}:{server.port}")
        # The caller leaves the session after the save's last barrier: the server outlives every commit.
        yield self.base.options.context(**threads, ocdbt_coordinator={"address": address})


@dataclass(frozen=True)
class PerProcessOcdbt(Sharded):
    """One OCDBT database per writer, as Orbax writes them; the writer count is kept beside them."""

    base: TensorStore
    form: ClassVar[str] = "per-process databases"
    how: ClassVar[str] = (
        "each rank writes its rows into its own OCDBT database (ocdbt.process_R, as Orbax does); "
        "a reader opens the writers' blocks over its rows as one array (ts.concat)"
    )
    WRITERS: ClassVar[str] = "ocdbt.writers.json"

    def save(self, tensors: Tensors, directory: Location, progress: Progress) -> None:
        entries = layout(tensors, dict.fromkeys(tensors, ""))
        self.save_shards(self.base.options.context(), tensors, entries, directory, Ranks())
        progress(sum(nbytes(t) for t in tensors.values()))

    def load(self, directory: Location, entries: Layout, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        tensors = self.load_shards(self.base.options.context(), directory, entries, Ranks())
        progress(sum(nbytes(t) for t in tensors.values()))
        return tensors

    def stored_names(self, directory: Location) -> set[str] | None:
        """Every process's database holds every tensor (its rows of it): their union."""
        databases = directory.folder.glob("ocdbt.process_*")
        return set().union(*(array_names(f"file://{db.resolve()}/") for db in databases))

    def load_each(self, directory: Location, entries: Layout) -> Iterator[tuple[Entry, torch.Tensor | Exception]]:
        context = self.base.options.context()
        for entry in entries:
            try:
                yield entry, self.load_shards(context, directory, (entry,), Ranks())[entry.name]
            except (ValueError, CheckpointError) as err:
                yield entry, err

    @contextlib.contextmanager
    def session(self, ranks: Ranks, writing: bool) -> Iterator[ts.Context]:
        yield self.base.options.context(data_copy_concurrency={"limit": ranks.threads})

    def _spec(self, directory: Location, writer: int, name: str) -> dict:
        base = directory.kvstore(f"ocdbt.process_{writer}/")
        return {"driver": self.base.options.format, "kvstore": {"driver": "ocdbt", "base": base, "path": f"{name}/"}}

    def save_shards(
        self, session: ts.Context, shards: Tensors, entries: Layout, directory: Location, ranks: Ranks
    ) -> None:
        options = self.base.options
        if ranks.rank == 0:
            directory.put_text(self.WRITERS, json.dumps({"writers": ranks.size}))

        def start(entry: Entry, rows: int) -> Any:
            metadata = options.metadata(list(_rows_only(rows, entry)), options.disk_dtype(entry.torch_dtype))
            spec = {
                **self._spec(directory, ranks.rank, entry.name),
                "metadata": metadata,
                "create": True,
                "store_data_equal_to_fill_value": True,
            }
            return ts.open(spec, context=session).result().write(to_numpy(shards[entry.name]))

        jobs = []
        for e in entries:
            lo, hi = ranks.rows(e.shape[0])
            if hi > lo:  # a rank with no rows of a tensor writes no array for it
                jobs.append((e.name, nbytes(shards[e.name]), lambda e=e, rows=hi - lo: start(e, rows)))
        self.base._pipeline(directory, jobs, lambda n: None)

    def _read(self, context: ts.Context, directory: Location, writers: int, entry: Entry, lo: int, hi: int) -> Any:
        blocks = [(w, *row_range(entry.shape[0], writers, w)) for w in range(writers)]
        parts = [(w, a) for w, a, b in blocks if a < hi and b > lo]
        opened = [
            ts.open(
                {**self._spec(directory, w, entry.name), "open": True, "fill_missing_data_reads": False},
                context=context,
            )
            for w, _ in parts
        ]
        layers = [future.result() for future in opened]
        array = layers[0] if len(layers) == 1 else ts.concat(layers, axis=0)
        first = parts[0][1]
        return ts.cast(array, _ts_dtype(entry.torch_dtype))[lo - first : hi - first].read()

    def load_shards(
        self, session: ts.Context, directory: Location, entries: Layout, ranks: Ranks
    ) -> OrderedDict[str, torch.Tensor]:
        try:
            text = directory.get_text(self.WRITERS)
            if text is None:
                raise FileNotFoundError(f"{directory.where(self.WRITERS)}: no such file")
            writers = int(json.loads(text)["writers"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{directory}: no readable {self.WRITERS}: {err}") from err
        tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
        jobs = []
        for e in entries:
            lo, hi = ranks.rows(e.shape[0])
            if hi == lo:
                tensors[e.name] = torch.empty(_rows_only(0, e), dtype=e.torch_dtype)
                continue
            size = (hi - lo) * math.prod(e.shape[1:]) * e.torch_dtype.itemsize
            jobs.append((e.name, size, lambda e=e, lo=lo, hi=hi: self._read(session, directory, writers, e, lo, hi)))
        arrays = self.base._pipeline(directory, jobs, lambda n: None)
        read = dict(zip((name for name, _, _ in jobs), arrays, strict=True))
        return OrderedDict(
            (e.name, tensors[e.name] if e.name in tensors else from_numpy(read[e.name])) for e in entries
        )


@dataclass(frozen=True)
class Gathered(Sharded):
    """A one-file format with ranks: the file has one writer and one reader, rank 0."""

    base: SingleFile
    form: ClassVar[str] = "gather to rank 0"
    how: ClassVar[str] = "gather to rank 0, save there (one file); rank 0 loads it and scatters each tensor's rows"

    def save_shards(self, session: None, shards: Tensors, entries: Layout, directory: Location, ranks: Ranks) -> None:
        whole = OrderedDict((e.name, _gather(shards[e.name], e, ranks)) for e in entries)
        if ranks.rank == 0:
            self.base.save(whole, directory, lambda n: None)

    def load_shards(
        self, session: None, directory: Location, entries: Layout, ranks: Ranks
    ) -> OrderedDict[str, torch.Tensor]:
        whole = self.base.load(directory, entries, lambda n: None) if ranks.rank == 0 else {}
        return OrderedDict((e.name, _scatter(whole.pop(e.name, None), e, ranks)) for e in entries)


def _row_bytes(entry: Entry) -> int:
    return math.prod(entry.shape[1:]) * entry.torch_dtype.itemsize


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as uint8: gloo moves any dtype that way, bfloat16 included."""
    return tensor.contiguous().view(-1).view(torch.uint8)


def _padded(data: torch.Tensor, size: int) -> torch.Tensor:
    """``data`` (uint8) as exactly ``size`` bytes: gloo's gather and scatter move equal sizes only."""
    if data.numel() == size:
        return data
    padded = torch.zeros(size, dtype=torch.uint8)
    padded[: data.numel()] = data
    return padded


def _gather(shard: torch.Tensor, entry: Entry, ranks: Ranks) -> torch.Tensor | None:
    """The whole tensor on rank 0 (None elsewhere), gathered straight into its final memory."""
    if ranks.group is None:
        return shard
    block = block_rows(entry.shape[0], ranks.size) * _row_bytes(entry)
    sent = _padded(_bytes(shard), block)
    if ranks.rank != 0:
        dist.gather(sent, None, group=ranks.group, group_dst=0)
        return None
    received = torch.empty(block * ranks.size, dtype=torch.uint8)
    dist.gather(sent, list(received.split(block)), group=ranks.group, group_dst=0)
    return received[: entry.nbytes].view(entry.torch_dtype).view(entry.shape)


def _scatter(whole: torch.Tensor | None, entry: Entry, ranks: Ranks) -> torch.Tensor:
    """This rank's rows of the tensor rank 0 holds whole."""
    if ranks.group is None:
        return whole
    lo, hi = ranks.rows(entry.shape[0])
    block = block_rows(entry.shape[0], ranks.size) * _row_bytes(entry)
    received = torch.empty(block, dtype=torch.uint8)
    parts = None
    if ranks.rank == 0:
        pieces = list(_bytes(whole).split(block))
        parts = [_padded(pieces[r] if r < len(pieces) else pieces[0][:0], block) for r in range(ranks.size)]
    dist.scatter(received, parts, group=ranks.group, group_src=0)
    return received[: (hi - lo) * _row_bytes(entry)].view(entry.torch_dtype).view(_rows_only(hi - lo, entry))


def forms(strategy: Strategy) -> tuple[Sharded, ...]:
    """How ``strategy`` runs with ranks: OCDBT both ways (one database and one per process), the rest one way."""
    if isinstance(strategy, Sharded):
        return (strategy,)
    if isinstance(strategy, DistributedCheckpoint):
        return (DTensorCheckpoint(strategy.name, strategy),)
    if isinstance(strategy, TensorStore):
        if strategy.options.driver == "ocdbt":
            return SharedOcdbt(strategy.name, strategy), PerProcessOcdbt(f"{strategy.name}+per-process", strategy)
        return (Regions(strategy.name, strategy),)
    if isinstance(strategy, SingleFile):
        return (Gathered(strategy.name, strategy),)
    raise UsageError(
        f"strategy {strategy.name} has no form with ranks (sharded: torch.distributed.checkpoint, TensorStore; "
        "gathered to rank 0: one-file formats); run it without --ranks"
    )


def rebuild(name: str, base: Strategy, form: str) -> Sharded:
    """The form a checkpoint's stored configuration names, around its rebuilt base strategy."""
    for candidate in forms(base):
        if candidate.form == form:
            return candidate if candidate.name == name else type(candidate)(name, candidate.base)
    raise CheckpointError(f"strategy {name}: {base.name} has no sharded form {form!r}")
