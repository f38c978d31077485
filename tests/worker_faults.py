"""Strategies that fail on purpose inside a round's worker process, for the tests of fresh processes per round.

A worker unpickles a strategy by importing its class, so they live in a module, not in a test.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ckptbench.strategies import Tensors, TorchSave


@dataclass(frozen=True)
class Killed(TorchSave):
    """``torch.save``, except that the process is killed (SIGKILL) as it starts writing."""

    def write(self, tensors: Tensors, target: Path | BinaryIO) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Raising(TorchSave):
    """``torch.save``, except that writing raises."""

    def write(self, tensors: Tensors, target: Path | BinaryIO) -> None:
        raise ValueError("boom while writing")
