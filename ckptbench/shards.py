"""Row shards: which rows of every tensor a rank holds, and a phase's ranks as one rank sees them.

Every tensor is split along its first dimension the way DTensor's ``Shard(0)`` splits it
(``torch.chunk``): ``ceil(rows / ranks)`` rows each, so trailing ranks get fewer rows or none. Any
process can compute any rank's rows from the shape alone; no layout has to travel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist


def block_rows(rows: int, ranks: int) -> int:
    """Rows per rank (the last non-empty rank may have fewer)."""
    return max(1, -(-rows // ranks))


def row_range(rows: int, ranks: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``rank`` among ``ranks``: 5 rows on 4 ranks are 2, 2, 1, 0."""
    lo = min(rows, rank * block_rows(rows, ranks))
    return lo, min(rows, lo + block_rows(rows, ranks))


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``: what ``DTensor.from_local`` needs for uneven shards."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(1, size)
    return tuple(reversed(strides))


def cores() -> int:
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Ranks:
    """The processes of one phase (a save or a load) as one of them sees it.

    The default is one process without ``torch.distributed``: a strategy's sharded code then
    writes or reads whole tensors. ``host`` is where the others reach a service rank 0 starts
    (OCDBT's coordinator); ``threads`` is this process's share of its host's cores.
    """

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = field(default=None, compare=False)
    host: str = "127.0.0.1"
    threads: int = field(default_factory=cores)
    timeout_s: float = 900.0
    """How long a barrier waits for the others (gloo's monitored barrier does not use the group's timeout)."""

    def rows(self, rows: int, rank: int | None = None) -> tuple[int, int]:
        return row_range(rows, self.size, self.rank if rank is None else rank)

    def barrier(self) -> None:
        """Wait for every rank of the phase; on a timeout gloo names the rank that did not arrive."""
        if self.group is not None:
            dist.monitored_barrier(self.group, timeout=timedelta(seconds=self.timeout_s))

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if self.group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]
