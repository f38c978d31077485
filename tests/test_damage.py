"""Damage to every format, found without a reference copy: a flipped byte, a deleted file, a truncated file.

Each damage hits the file holding one tensor's first bytes. ``python -m ckptbench verify`` (one real
process for all of them) must name that tensor and exit 1; loading must refuse or, where the library
cannot tell (a flipped byte it does not checksum), ``verify`` is what flags it.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ckptbench import STRATEGIES, CheckpointError, TensorStore, TensorStoreOptions, get_strategy
from ckptbench.manifest import MANIFEST
from ckptbench.strategies import Strategy

from conftest import load_checkpoint, run, save_checkpoint

TENSOR = "model.layers.3.self_attn.q_proj.weight"
CHECKSUMMED = TensorStore("ts+checksum", TensorStoreOptions(format="zarr3", checksum=True))
FORMATS: dict[str, Strategy] = {
    "zarr v2 raw": get_strategy("tensorstore"),
    "zarr v2 gzip": get_strategy("ts+compression"),
    "zarr3": get_strategy("ts+zarr3"),
    "zarr3 crc32c": CHECKSUMMED,
    "ocdbt": get_strategy("ts+ocdbt"),
    "torch.save": get_strategy("pytorch"),
    "safetensors": get_strategy("safetensors"),
    "dcp": get_strategy("dcp"),
}
DAMAGES = ("flip", "delete", "truncate")
pytestmark = pytest.mark.slow  # a checkpoint of every format, damaged three ways, and a verify process
CAUGHT_BY_THE_LIBRARY_ON_A_FLIP = {"zarr v2 gzip", "zarr3 crc32c"}
"""Formats whose reader checks the bytes themselves (gzip's check, crc32c); the others load a flipped byte."""


@dataclass(frozen=True)
class Damaged:
    fmt: str
    strategy: Strategy
    damage: str
    path: Path
    file: str
    """The file damaged, relative to the checkpoint."""
    original: Path
    """The intact checkpoint it was copied from."""


def _stored(strategy: Strategy, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in the dtype its format stores it in."""
    return tensor.to(strategy.options.disk_dtype(tensor.dtype)) if isinstance(strategy, TensorStore) else tensor


def _holder(directory: Path, needle: bytes) -> tuple[Path, int | None]:
    """The file holding ``needle`` and its offset; the first chunk and None when compressed (not findable)."""
    found = []
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        data = file.read_bytes()
        offset = data.find(needle)
        while offset >= 0:
            found.append((file, offset))
            offset = data.find(needle, offset + 1)
    if not found:
        return directory / TENSOR / "0.0", None
    assert len(found) == 1, found
    return found[0]


def _damage(directory: Path, stored: torch.Tensor, damage: str) -> Path:
    file, offset = _holder(directory, stored[0, :16].numpy().tobytes())
    data = bytearray(file.read_bytes())
    if damage == "flip":
        # The sign bit of the tensor's second element (little-endian: its last byte), so the value
        # changes; in a compressed chunk, a byte in the middle of the stream.
        at = len(data) // 2 if offset is None else offset + 2 * stored.element_size() - 1
        data[at] ^= 0x80
        file.write_bytes(bytes(data))
    elif damage == "delete":
        file.unlink()
    else:
        file.write_bytes(bytes(data[: len(data) // 2 if offset is None else offset + 8]))
    return file


@pytest.fixture(scope="module")
def damaged(tiny, saved, tmp_path_factory) -> list[Damaged]:
    """One copy of each format per damage; the intact originals are the session's where it has them."""
    root = tmp_path_factory.mktemp("damage")
    cases = []
    for fmt, strategy in FORMATS.items():
        if strategy.name in STRATEGIES:
            original = saved[strategy.name].path
        else:
            original = root / "intact" / fmt.replace(" ", "-")
            save_checkpoint(strategy, tiny.tensors, original)
        for damage in DAMAGES:
            path = shutil.copytree(original, root / damage / fmt.replace(" ", "-"))
            file = _damage(path, _stored(strategy, tiny.tensors[TENSOR]), damage)
            cases.append(Damaged(fmt, strategy, damage, path, str(file.relative_to(path)), original))
    return cases


def test_verify_names_the_damaged_tensor_in_every_format(damaged, tmp_path):
    intact = sorted({case.original for case in damaged})
    result = run("verify", *(case.path for case in damaged), *intact, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    for case in damaged:
        named = [line for line in lines if line.startswith(f"{case.path}: DAMAGED {TENSOR}: ")]
        assert len(named) == 1, f"{case.fmt}, {case.damage} of {case.file}: {TENSOR} not named in\n{result.stdout}"
        summary = [line for line in lines if line.startswith(f"{case.path}: ") and "DAMAGED: " in line]
        assert len(summary) == 1, case
        assert "of 238 tensors" in summary[0], case
    for path in intact:
        assert not any(line.startswith(f"{path}: DAMAGED") for line in lines)
        assert any(line.startswith(f"{path}: ") and line.endswith("238 tensors, intact") for line in lines), path


@pytest.mark.parametrize("damage", DAMAGES)
def test_loading_refuses_damage_unless_only_verify_can_tell(damage, damaged, tiny):
    for case in (c for c in damaged if c.damage == damage):
        refused = damage != "flip" or case.fmt in CAUGHT_BY_THE_LIBRARY_ON_A_FLIP
        if refused:
            with pytest.raises(CheckpointError, match=re.escape(str(case.path))):
                load_checkpoint(case.strategy, case.path)
        else:  # the library hands back a wrong value without a word: only the digests know
            loaded = load_checkpoint(case.strategy, case.path)
            assert not torch.equal(loaded[TENSOR], tiny.tensors[TENSOR]), case
            assert (loaded[TENSOR] != tiny.tensors[TENSOR]).sum() == 1, case
