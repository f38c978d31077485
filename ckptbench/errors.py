"""Errors a user can act on: each names what is wrong and what is valid."""

from __future__ import annotations


class CkptbenchError(Exception):
    """Base class: the CLI turns these into a one-line message and a non-zero exit."""


class UnknownChoiceError(CkptbenchError, ValueError):
    """An unknown strategy or preset name."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; valid choices: {', '.join(valid)}")
        self.kind, self.name, self.valid = kind, name, valid


class ModelSourceError(CkptbenchError):
    """A local model directory that is missing, incomplete or not a Llama-family model."""


class CompositionError(CkptbenchError):
    """A checkpoint mapping whose names, count or dtypes differ from what the model defines."""


class CheckpointError(CkptbenchError):
    """A checkpoint that is missing, incomplete or unreadable."""


class InsufficientDiskSpaceError(CkptbenchError):
    """Refused before writing: the next checkpoint would not fit."""

    def __init__(self, path: str, needed: int, free: int) -> None:
        super().__init__(
            f"not enough free disk under {path}: the next checkpoint needs about "
            f"{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
        )
        self.needed, self.free = needed, free


class VerificationError(CkptbenchError):
    """A loaded checkpoint that differs from what was saved."""
