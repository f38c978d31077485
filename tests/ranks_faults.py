"""A strategy that fails on purpose on one rank, for the tests of runs with ranks.

Spawned ranks unpickle a strategy by importing its class, so it lives in a module, not in a test.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import ClassVar

from ckptbench.location import Location
from ckptbench.strategies.sharded import Regions

FAULT_TIME = "fault-time"
"""Written beside the checkpoint (in the output folder) just before the fault: when it happened."""


@dataclass(frozen=True)
class Faulty(Regions):
    """ts+chunks with ranks, except on ``rank``: ``kill`` (SIGKILL) or ``hang`` once its rows are saved,
    ``raise`` on loading, or ``corrupt`` the rows it loads (one element of one tensor)."""

    rank: int = 1
    fault: str = "kill"
    form: ClassVar[str] = "faulty"

    def _mark(self, directory: Location) -> None:
        if directory.local:  # on a bucket the test times the whole run instead
            (directory.folder.parent / FAULT_TIME).write_text(repr(time.time()))

    def save_shards(self, session, shards, entries, directory, ranks) -> None:
        super().save_shards(session, shards, entries, directory, ranks)
        if ranks.rank == self.rank and self.fault == "kill":
            self._mark(directory)
            os.kill(os.getpid(), signal.SIGKILL)
        if ranks.rank == self.rank and self.fault == "hang":
            self._mark(directory)
            time.sleep(600)

    def load_shards(self, session, directory, entries, ranks):
        if ranks.rank == self.rank and self.fault == "raise":
            self._mark(directory)
            raise ValueError(f"boom on rank {ranks.rank}")
        loaded = super().load_shards(session, directory, entries, ranks)
        if ranks.rank == self.rank and self.fault == "corrupt":
            first = next(iter(loaded.values()))
            first.view(-1)[0] += 1
        return loaded
