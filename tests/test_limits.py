"""The limits probe measures the disk in the run and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptbench import limits
from ckptbench.errors import InsufficientDiskSpaceError


def test_probe_measures_and_cleans_up(tmp_path):
    measured = limits.probe(tmp_path, 4 << 20, repeats=2, block=1 << 20)
    assert measured.write_gbps > 0
    assert measured.read_gbps > 0
    assert measured.probe_bytes == 4 << 20
    assert measured.probe_s > 0
    assert list(tmp_path.iterdir()) == []


def test_probe_refuses_a_disk_without_room(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "ensure_free", _refuse)
    with pytest.raises(InsufficientDiskSpaceError):
        limits.probe(tmp_path, 4 << 20)
    assert list(tmp_path.iterdir()) == []


def _refuse(directory: Path, needed: int, what: str) -> None:
    raise InsufficientDiskSpaceError(str(directory), needed, 0, what)
