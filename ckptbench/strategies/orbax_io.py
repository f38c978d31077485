"""The Orbax calls the Orbax strategies make, with its logging quiet, and a restore into existing arrays.

Orbax's own ``NumpyHandler`` always reads into new arrays (a target only lends its structure and
dtype), so resuming a live model would cost a second copy. The handler here opens each array with
Orbax's own read spec and lets TensorStore write into the caller's memory. Imported only when an
Orbax strategy first runs: importing Orbax imports jax, which takes seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
import tensorstore as ts

logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax logs through absl; a benchmark's output is its tables
import orbax.checkpoint as ocp  # noqa: E402
from orbax.checkpoint import type_handlers  # noqa: E402


@dataclass
class IntoArgs(ocp.RestoreArgs):
    """Restore arguments naming the array to read into."""

    out: np.ndarray | None = None


class InPlaceNumpyHandler(type_handlers.NumpyHandler):
    """Reads each array into ``IntoArgs.out`` (same memory); a dtype or shape that differs is an error."""

    async def deserialize(
        self, infos: Sequence[type_handlers.ParamInfo], args: Sequence[ocp.RestoreArgs] | None = None
    ) -> list[np.ndarray]:
        if args is None or not all(isinstance(arg, IntoArgs) and arg.out is not None for arg in args):
            return await super().deserialize(infos, args)
        # Every read runs to its end, even after one fails: a TensorStore future still pending when Orbax closes
        # its event loop would report into a closed loop.
        filled = await asyncio.gather(
            *(self._fill(i, a.out) for i, a in zip(infos, args, strict=True)), return_exceptions=True
        )
        failed = next((f for f in filled if isinstance(f, BaseException)), None)
        if failed is not None:
            raise failed
        return [arg.out for arg in args]

    async def _fill(self, info: type_handlers.ParamInfo, out: np.ndarray) -> None:
        await info.await_path_creation()
        spec = type_handlers.get_json_tspec_read(
            info,
            use_ocdbt=info.is_ocdbt_checkpoint,
            metadata_key=self._metadata_key,
            raise_array_data_missing_error=info.raise_array_data_missing_error,
        )
        source = await ts.open(ts.Spec(spec), open=True, read=True, context=info.ts_context)
        await ts.array(out, copy=False, write=True).write(source)


def checkpointer(compression: bool, asynchronous: bool) -> ocp.AbstractCheckpointer:
    """Orbax's PyTree checkpointer with its defaults but ``use_compression``; the async one returns after its copy."""
    handler = ocp.PyTreeCheckpointHandler(use_compression=compression)
    return ocp.AsyncCheckpointer(handler) if asynchronous else ocp.Checkpointer(handler)


def save(checkpointer: ocp.AbstractCheckpointer, root: str, arrays: dict) -> None:
    checkpointer.save(root, args=ocp.args.PyTreeSave(arrays))


def restore(root: str) -> dict:
    """Every array in the dtype it was saved in (no target, so no cast), keyed by name in Orbax's sorted order."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(root)


def restore_into(root: str, arrays: dict) -> None:
    """Read each array of the checkpoint into the one at the same place in ``arrays`` (nested dicts)."""
    registry = type_handlers.create_type_handler_registry((np.ndarray, InPlaceNumpyHandler()))
    restore_args = jax.tree.map(lambda array: IntoArgs(restore_type=np.ndarray, out=array), arrays)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as checkpointer:
        checkpointer.restore(root, args=ocp.args.PyTreeRestore(item=arrays, restore_args=restore_args))
