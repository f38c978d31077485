"""Bit-for-bit comparison of a loaded checkpoint with what was saved.

Verification runs after every load of a multi-GB checkpoint, so it compares raw memory with
``memcmp`` in blocks on every core (ctypes releases the GIL): several times faster than
``torch.equal`` and exact by construction, since bytes are what was stored.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import VerificationError

_BLOCK = 64 << 20
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_memcmp = ctypes.CDLL(None).memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def _blocks(got: torch.Tensor, want: torch.Tensor) -> list[tuple[int, int, int]]:
    size = want.numel() * want.element_size()
    return [(got.data_ptr() + o, want.data_ptr() + o, min(_BLOCK, size - o)) for o in range(0, size, _BLOCK)]


def _differing_elements(got: torch.Tensor, want: torch.Tensor) -> int:
    bits = _BITS[want.element_size()]
    return int((got.view(bits) != want.view(bits)).sum())


def check_identical(loaded: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise naming the first tensor that is missing, extra, reordered or different in dtype, shape or bits.

    Bits, not values: -0.0 against 0.0 and different NaN payloads count as differences.
    """
    missing = [name for name in expected if name not in loaded]
    extra = [name for name in loaded if name not in expected]
    if missing or extra:
        raise VerificationError(
            f"{source}: loaded {len(loaded)} tensors, saved {len(expected)} (missing {missing[:5]}, extra {extra[:5]})"
        )
    if list(loaded) != list(expected):
        raise VerificationError(f"{source}: tensors came back in a different order")
    pairs = []
    for name, want in expected.items():
        got = loaded[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise VerificationError(
                f"{source}: tensor {name} is {got.dtype} {tuple(got.shape)}, saved {want.dtype} {tuple(want.shape)}"
            )
        pairs.append((name, got.contiguous(), want.contiguous()))
    blocks = [(name, block) for name, got, want in pairs for block in _blocks(got, want)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        equal = list(pool.map(lambda b: _memcmp(*b[1]) == 0, blocks))
    if not all(equal):
        name = blocks[equal.index(False)][0]
        got, want = next((g, w) for n, g, w in pairs if n == name)
        raise VerificationError(
            f"{source}: tensor {name} differs from what was saved in {_differing_elements(got, want)} elements"
        )


def matches(
    loaded: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str, log: Callable[[str], None]
) -> bool:
    """``check_identical`` as a verdict: a mismatch is logged and recorded as a row's ``verified``, not raised."""
    try:
        check_identical(loaded, expected, source)
    except VerificationError as err:
        log(f"VERIFICATION FAILED: {err}")
        return False
    return True
