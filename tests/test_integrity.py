"""The parts the fault suite relies on, each quick: an atomic replace, stale leftovers cleaned by one of
several runs, the output folder checked up front, TensorStore's strictness and zarr3 checksums as knobs,
and a full disk recognised whatever a library calls it."""

from __future__ import annotations

import errno
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from ckptbench import (
    CheckpointError,
    OutputFolderError,
    TensorStore,
    TensorStoreOptions,
    UsageError,
    checkpoint,
    disk,
    get_strategy,
    sweep,
)
from ckptbench.bitwise import check_identical
from ckptbench.checkpoint import _disk_full
from ckptbench.local import Folder
from ckptbench.strategies import MiB

from conftest import dead_pid, leftovers, load_checkpoint, save_checkpoint

# --- replacing, cleaning, the output folder ---------------------------------------------------------------------


def _old_and_new(tmp_path: Path) -> tuple[Path, Path]:
    """A complete checkpoint holding "old" and a staged one holding "new", to install over it."""
    final, source = tmp_path / "ckpt", tmp_path / ".ckpt.work-1-x"
    for directory, text in ((final, "old"), (source, "new")):
        directory.mkdir()
        (directory / "data").write_text(text)
    return final, source


def test_install_exchanges_so_the_name_always_holds_a_checkpoint(tmp_path, monkeypatch):
    final, source = _old_and_new(tmp_path)
    seen: list[str] = []
    real_remove = disk.remove

    def watching_remove(path):
        seen.append((final / "data").read_text())  # deleting the old one: the new one is already in place
        real_remove(path)

    monkeypatch.setattr(disk, "remove", watching_remove)
    disk.install(source, final)
    assert seen == ["new"]
    assert (final / "data").read_text() == "new"
    assert leftovers(tmp_path) == ["ckpt"]


def test_two_installs_at_once_both_succeed_and_leave_one_checkpoint(tmp_path):
    final = tmp_path / "ckpt"

    def install_many(label: str) -> None:
        for n in range(30):
            source = tmp_path / f".ckpt.work-{label}-{n}"
            source.mkdir()
            (source / "data").write_text(f"{label}{n}")
            disk.install(source, final)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(install_many, ["a", "b"]))
    assert (final / "data").read_text() in {"a29", "b29"}
    assert leftovers(tmp_path) == ["ckpt"]


def test_install_without_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    def unsupported(source, target, flags):
        raise OSError(errno.EINVAL, "Invalid argument", str(source))

    monkeypatch.setattr(disk, "_renameat2", unsupported)
    final, source = _old_and_new(tmp_path)
    disk.install(source, final)
    assert (final / "data").read_text() == "new"
    assert leftovers(tmp_path) == ["ckpt"]


def test_a_stale_entry_is_cleaned_by_one_of_two_cleaners_and_a_live_deletion_is_left_alone(tmp_path):
    dead = dead_pid()
    stale = [tmp_path / f".t{n}{disk.WORKING}{dead}-abc" for n in range(20)]
    for path in stale:
        (path / "sub").mkdir(parents=True)
    being_deleted = tmp_path / f".t{disk.WORKING}{dead}-abc{disk.PARTIAL}{os.getpid()}-0"
    being_deleted.mkdir()
    with ThreadPoolExecutor(2) as pool:
        cleaned = list(pool.map(disk.clean_stale, [tmp_path, tmp_path]))
    assert sorted(cleaned[0] + cleaned[1]) == sorted(stale)
    assert leftovers(tmp_path) == [being_deleted.name]


def test_an_output_folder_under_a_file_or_unwritable_is_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="file is a file, not a folder"):
        disk.check_folder(tmp_path / "file" / "out")
    disk.check_folder(tmp_path / "new" / "out")
    assert leftovers(tmp_path) == ["file"]
    monkeypatch.setattr(disk.os, "access", lambda path, mode: False)
    with pytest.raises(OutputFolderError, match=rf"output folder {tmp_path / 'new'}: {tmp_path}: permission denied"):
        disk.check_folder(tmp_path / "new")


# --- TensorStore strictness and checksums ---------------------------------------------------------------------


STRICT_OFF = TensorStore("ts[strict=off]", TensorStoreOptions(chunk_bytes=1 * MiB, strict=False))
CHECKSUM = TensorStore("ts[checksum=on]", TensorStoreOptions(chunk_bytes=1 * MiB, format="zarr3", checksum=True))
SHARD_TENSOR = "model.layers.3.self_attn.q_proj.weight"


def test_strict_is_the_default_and_off_reads_a_missing_chunk_as_zeros(tiny, tmp_path):
    assert TensorStoreOptions().strict
    assert STRICT_OFF.reads(get_strategy("ts+chunks").config())
    path = tmp_path / "lenient"
    save_checkpoint(STRICT_OFF, tiny.tensors, path)
    (path / SHARD_TENSOR / "0.0").unlink()
    loaded = load_checkpoint(STRICT_OFF, path)  # TensorStore's default: the fill value, without a word
    assert not loaded[SHARD_TENSOR].any()
    with pytest.raises(CheckpointError, match="NOT_FOUND"):
        load_checkpoint(get_strategy("ts+chunks"), path)  # the same files, read strictly
    (damage,) = checkpoint.verify(path).damage  # verify rebuilds the lenient reader; digests tell
    assert damage.tensor == SHARD_TENSOR
    assert "digest" in damage.problem


def test_zarr3_checksum_makes_tensorstore_refuse_a_flipped_byte(tiny, tmp_path):
    assert not TensorStoreOptions(checksum=True).is_valid()  # zarr v2 has no checksum codec
    assert CHECKSUM.options.is_valid()
    path = tmp_path / "checksummed"
    usage = save_checkpoint(CHECKSUM, tiny.tensors, path)
    assert usage.bytes_allocated <= CHECKSUM.estimate_bytes(tiny.tensors)
    check_identical(load_checkpoint(CHECKSUM, path), tiny.tensors, "checksummed")
    shard = path / SHARD_TENSOR / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0x80  # the sign of the tensor's second element, stored first in the shard
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="Digest mismatch"):
        load_checkpoint(CHECKSUM, path)


def test_strictness_and_the_zarr3_checksum_are_knobs():
    assert sweep.parse_knob("strict=on,off") == ("strict", [True, False])
    assert [s.name for s in sweep.grid({"strict": [True, False]})] == ["ts[strict=on]", "ts[strict=off]"]
    grid = sweep.grid({"format": ["zarr", "zarr3"], "checksum": [False, True]})
    assert [s.name for s in grid] == [
        "ts[format=zarr,checksum=off]",
        "ts[format=zarr3,checksum=off]",
        "ts[format=zarr3,checksum=on]",
    ]


# --- a full disk, whatever the library calls it -----------------------------------------------------------------


def test_a_full_disk_is_recognised_through_any_librarys_wording(tmp_path, monkeypatch):
    enospc = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise enospc
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as err:
        torch_save = err
    wrapped = RuntimeError("rank 0: RuntimeError: unexpected pos")
    wrapped.__cause__ = torch_save
    assert _disk_full(wrapped, Folder(tmp_path))  # dcp: the rank's error, whose context is the ENOSPC
    assert _disk_full(
        ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']"), Folder(tmp_path)
    )
    cryptic = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 20001536 vs 20001488")
    assert not _disk_full(cryptic, Folder(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    assert _disk_full(cryptic, Folder(tmp_path))  # torch.save names nothing: the filesystem's state does


def test_a_damaged_distributed_checkpoint_is_one_line(tiny, tmp_path):
    path = tmp_path / "dcp"
    save_checkpoint(get_strategy("dcp"), tiny.tensors, path)
    next(path.glob("*.distcp")).unlink()
    with pytest.raises(CheckpointError, match="unreadable distributed checkpoint: rank 0: FileNotFoundError") as info:
        load_checkpoint(get_strategy("dcp"), path)
    assert "\n" not in str(info.value)
