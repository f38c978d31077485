"""Bit-for-bit comparison of a loaded checkpoint with what was saved."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import VerificationError

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The stored bits as integers, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return tensor.contiguous().view(_BITS[tensor.element_size()])


def verify(loaded: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise naming the first tensor that is missing, extra, reordered or different in dtype, shape or bits."""
    missing = [name for name in expected if name not in loaded]
    extra = [name for name in loaded if name not in expected]
    if missing or extra:
        raise VerificationError(
            f"{source}: loaded {len(loaded)} tensors, saved {len(expected)} (missing {missing[:5]}, extra {extra[:5]})"
        )
    if list(loaded) != list(expected):
        raise VerificationError(f"{source}: tensors came back in a different order")
    for name, want in expected.items():
        got = loaded[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise VerificationError(
                f"{source}: tensor {name} is {got.dtype} {tuple(got.shape)}, saved {want.dtype} {tuple(want.shape)}"
            )
        if not torch.equal(_bits(got), _bits(want)):
            differing = int((_bits(got) != _bits(want)).sum())
            raise VerificationError(f"{source}: tensor {name} differs from what was saved in {differing} elements")
