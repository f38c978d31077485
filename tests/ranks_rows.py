"""What the ranks of a test's process group run to write rows with some ranks and read them back with others.

Spawned ranks import the function they run, so it lives in a module, not in a test.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ckptbench import manifest
from ckptbench.bitwise import check_identical
from ckptbench.launch import World
from ckptbench.local import Folder
from ckptbench.shards import Ranks
from ckptbench.strategies.sharded import Sharded

TIMEOUT_S = 120.0


def tensors() -> dict[str, torch.Tensor]:
    """Small tensors whose rows split unevenly, one with fewer rows than ranks (some ranks hold none of it)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "wide": torch.randn(10, 6, generator=generator).half(),
        "two rows": torch.randn(2, 3, generator=generator),
        "vector": torch.randn(7, generator=generator).half(),
    }


def _rows(ranks: Ranks, tensor: torch.Tensor) -> torch.Tensor:
    lo, hi = ranks.rows(tensor.shape[0])
    return tensor[lo:hi]


def write_then_read(world: World, form: Sharded, directory: Path, writers: int, readers: list[int]) -> None:
    """The first ``writers`` ranks save their rows at once; then, for each count in ``readers``, that many
    ranks load their rows, each rank verifying its own bit for bit (a mismatch fails the rank, naming it)."""
    data = tensors()
    entries = manifest.layout(data, dict.fromkeys(data, ""))
    timeout = timedelta(seconds=TIMEOUT_S)
    groups = {  # every rank makes every group, in the same order
        count: dist.group.WORLD if count == world.size else dist.new_group(list(range(count)), timeout=timeout)
        for count in sorted({writers, *readers})
    }

    def phase(count: int) -> Ranks | None:
        if world.rank >= count:
            return None
        return Ranks(world.rank, count, groups[count], world.host, world.threads, TIMEOUT_S)

    if (ranks := phase(writers)) is not None:
        with form.session(ranks, writing=True) as session:
            form.save_shards(session, {n: _rows(ranks, t) for n, t in data.items()}, entries, Folder(directory), ranks)
            ranks.barrier()  # a session (OCDBT's coordinator) outlives every rank's writes
    dist.barrier()
    for count in readers:
        if (ranks := phase(count)) is not None:
            with form.session(ranks, writing=False) as session:
                loaded = form.load_shards(session, Folder(directory), entries, ranks)
            expected = {n: _rows(ranks, t) for n, t in data.items()}
            check_identical(loaded, expected, f"{form.name}, rank {ranks.rank} of {count} reading what {writers} wrote")
        dist.barrier()
