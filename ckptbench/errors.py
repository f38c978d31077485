"""Errors a user can act on: each names what is wrong and what is valid.

``exit_code`` is what the CLI exits with: 2 for input the user can correct, 1 for the environment
(disk, files, libraries) or a result that did not hold.
"""

from __future__ import annotations


def gigabytes(*sizes: int) -> list[str]:
    """Byte counts in GB with the fewest decimals (at least two) that tell unequal ones apart."""
    for digits in range(2, 10):
        shown = [f"{size / 1e9:.{digits}f}" for size in sizes]
        if len(set(shown)) == len(set(sizes)):
            return shown
    return shown


class CkptbenchError(Exception):
    """Base class: the CLI turns these into a one-line message and a non-zero exit."""

    exit_code = 1


class UsageError(CkptbenchError, ValueError):
    """A setting or argument that cannot work, refused before anything is written."""

    exit_code = 2


class UnknownChoiceError(UsageError):
    """An unknown strategy or preset name."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; valid choices: {', '.join(valid)}")
        self.kind, self.name, self.valid = kind, name, valid


class ModelSourceError(CkptbenchError):
    """A local model directory that is missing, incomplete or not a Llama-family model."""


class CompositionError(CkptbenchError):
    """A checkpoint mapping whose names, count or dtypes differ from what the model defines."""


class CheckpointError(CkptbenchError):
    """A checkpoint that is missing, incomplete, damaged or unreadable."""


class ResultsFileError(CkptbenchError):
    """A results file that does not exist or is not one ckptbench wrote."""


class InsufficientDiskSpaceError(CkptbenchError):
    """Refused before writing: what comes next would not fit."""

    def __init__(self, path: str, needed: int, free: int, what: str = "the next checkpoint") -> None:
        need, have = gigabytes(needed, free)
        super().__init__(f"not enough free disk under {path}: {what} needs about {need} GB, {have} GB are free")
        self.needed, self.free = needed, free


class InsufficientMemoryError(CkptbenchError):
    """Refused before loading: the load would take more memory than is available, and the kernel would kill the run."""

    def __init__(self, what: str, needed: int, available: int, held: str = "") -> None:
        need, have = gigabytes(needed, available)
        said = f"not enough memory: {what} needs about {need} GB, {have} GB are available"
        super().__init__(f"{said}; {held}" if held else said)
        self.needed, self.available = needed, available


class OutputFolderError(CkptbenchError):
    """An output folder that cannot be created or written (read-only, no permission)."""


class DiskFullError(CkptbenchError):
    """The disk filled up during a write that the free-space check expected to fit."""


class VerificationError(CkptbenchError):
    """A loaded checkpoint that differs from what was saved."""
