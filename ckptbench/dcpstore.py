"""torch.distributed.checkpoint on any store: torch's own writer and reader, over a folder or a bucket.

On a folder they are ``FileSystemWriter``/``FileSystemReader``. On a bucket they are the same classes
with their ``FileSystemBase`` swapped for one whose files are objects under the checkpoint's prefix,
moved by the project's S3 client (so botocore counts every request): DCP's planning, file layout and
metadata stay torch's. torch's fsspec writer would do the same through s3fs, which is not installed
and would pin a second S3 client stack beside boto3.

A file is written into memory and uploaded when DCP closes it (multipart, in parallel parts), so it
is durable once DCP's write returns and there is nothing to fsync (``sync_files`` off: torch would
otherwise call ``os.sync`` for a stream without a descriptor). Each item a reader needs is one ranged
GET of its bytes, not the whole file: a reshard reads what it keeps, as on disk.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemBase

from .location import Location
from .objectstore import Prefix


class ObjectFile:
    """One object opened for reading: whole for DCP's metadata (``read``), by range for its items (``range``)."""

    def __init__(self, prefix: Prefix, name: str) -> None:
        self.prefix, self.name = prefix, name
        self._whole: io.BytesIO | None = None

    def range(self, offset: int, length: int) -> bytes:
        key = f"{self.prefix.key}{self.name}"
        found = self.prefix.client.get_object(
            Bucket=self.prefix.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
        )
        data = found["Body"].read()
        if len(data) != length:
            raise OSError(f"{self.prefix.where(self.name)}: {len(data)} bytes at {offset}, expected {length}")
        return data

    def _body(self) -> io.BytesIO:
        if self._whole is None:
            self._whole = self.prefix.read(self.name, lambda source: source)
        return self._whole

    def read(self, size: int = -1) -> bytes:
        return self._body().read(size)

    def readline(self, size: int = -1) -> bytes:
        return self._body().readline(size)


class _Buffer(io.BytesIO):
    """A file being written, in memory: DCP closes it after each item it writes, so only ``release`` frees it."""

    def close(self) -> None:
        """Kept open: the file is uploaded once DCP is done with all of it."""

    def release(self) -> None:
        super().close()


class ObjectFiles(FileSystemBase):
    """DCP's files as objects under ``prefix``; a path is an object's name relative to it."""

    def __init__(self, prefix: Prefix) -> None:
        self.prefix = prefix

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if mode == "rb":
            yield ObjectFile(self.prefix, str(path))
            return
        if mode != "wb":
            raise ValueError(f"{self.prefix.where(str(path))}: objects are written whole or read, not {mode!r}")
        buffer = _Buffer()
        yield buffer
        buffer.seek(0)
        self.prefix.upload(str(path), buffer)
        buffer.release()

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{path}/{suffix}" if str(path) else suffix

    def init_path(self, path: str | os.PathLike) -> str:
        return str(path)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        """No rename in a bucket: a server-side copy, then the old object goes."""
        s3, bucket, key = self.prefix.client, self.prefix.bucket, self.prefix.key
        s3.copy_object(Bucket=bucket, Key=f"{key}{new_path}", CopySource={"Bucket": bucket, "Key": f"{key}{path}"})
        s3.delete_object(Bucket=bucket, Key=f"{key}{path}")

    def mkdir(self, path: str | os.PathLike) -> None:
        """A prefix needs no making."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False

    def exists(self, path: str | os.PathLike) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.prefix.client.head_object(Bucket=self.prefix.bucket, Key=f"{self.prefix.key}{path}")
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def rm_file(self, path: str | os.PathLike) -> None:
        self.prefix.client.delete_object(Bucket=self.prefix.bucket, Key=f"{self.prefix.key}{path}")


class ObjectWriter(dcp.FileSystemWriter):
    """torch's writer with its files as objects: one per writer thread and rank, as on disk."""

    def __init__(self, prefix: Prefix, thread_count: int) -> None:
        super().__init__("", thread_count=thread_count, sync_files=False)
        self.fs = ObjectFiles(prefix)
        self.path = self.fs.init_path("")


class ObjectReader(dcp.FileSystemReader):
    """torch's reader with its files as objects; each item it needs is one ranged GET."""

    def __init__(self, prefix: Prefix) -> None:
        super().__init__("")
        self.fs = ObjectFiles(prefix)
        self.path = self.fs.init_path("")

    def _slice_file(self, file: ObjectFile, sinfo: Any) -> io.BytesIO:
        return io.BytesIO(file.range(sinfo.offset, sinfo.length))


def writer(directory: Location, thread_count: int) -> dcp.FileSystemWriter:
    """DCP's writer for ``directory``: into its folder, or its objects when it is a prefix in a bucket."""
    if isinstance(directory, Prefix):
        return ObjectWriter(directory, thread_count)
    return dcp.FileSystemWriter(directory.folder, thread_count=thread_count)


def reader(directory: Location) -> dcp.FileSystemReader:
    """DCP's reader for ``directory`` (a folder, or a prefix in a bucket)."""
    if isinstance(directory, Prefix):
        return ObjectReader(directory)
    return dcp.FileSystemReader(directory.folder)
