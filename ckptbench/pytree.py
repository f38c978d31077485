"""Nested state as named tensors plus a JSON record of its structure, and back.

A training checkpoint is nested dicts and lists of tensors, Python numbers and a few strings. Every
number becomes a tensor (a list of ints or of floats one tensor), so each leaf that holds data is a
tensor every strategy can write and the manifest can digest; the structure (containers, key types,
strings, None) is plain JSON kept in the manifest. Names join the path with ``/``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from .errors import CheckpointError

SEPARATOR = "/"
Structure = dict[str, Any]


class Flat(OrderedDict):
    """Named tensors that remember the structure they were flattened from (``structure``)."""

    structure: Structure | None = None


def structure_of(tensors: Mapping[str, torch.Tensor]) -> Structure | None:
    """The structure a mapping was flattened from; None for a plain mapping of tensors (the weights)."""
    return getattr(tensors, "structure", None)


def _is(values: Any, kind: type) -> bool:
    return bool(values) and all(type(v) is kind for v in values)


def flatten(tree: Any) -> Flat:
    """Every number and tensor of ``tree`` as a named tensor, in walking order; its structure in ``.structure``."""
    flat = Flat()

    def walk(node: Any, path: tuple[str, ...]) -> Structure:
        name = SEPARATOR.join(path)
        if isinstance(node, torch.Tensor):
            flat[name] = node.detach()
            return {"tensor": name}
        if isinstance(node, bool):
            flat[name] = torch.tensor(int(node), dtype=torch.int64)
            return {"bool": name}
        if isinstance(node, int):
            flat[name] = torch.tensor(node, dtype=torch.int64)
            return {"int": name}
        if isinstance(node, float):
            flat[name] = torch.tensor(node, dtype=torch.float64)
            return {"float": name}
        if isinstance(node, list | tuple):
            container = type(node).__name__
            for kind, dtype in ((int, torch.int64), (float, torch.float64)):
                if _is(node, kind):
                    flat[name] = torch.tensor(node, dtype=dtype)
                    return {f"{kind.__name__}s": name, "container": container}
            return {container: [walk(item, (*path, str(i))) for i, item in enumerate(node)]}
        if isinstance(node, Mapping):
            items = []
            for key, value in node.items():
                if not isinstance(key, str | int) or SEPARATOR in str(key):
                    raise ValueError(f"{name or 'the state'}: key {key!r} cannot name a leaf")
                items.append([key, walk(value, (*path, str(key)))])
            return {"dict": items}
        if node is None or isinstance(node, str):
            return {"value": node}
        raise TypeError(f"{name}: a {type(node).__name__} is not state ckptbench can save")

    flat.structure = walk(tree, ())
    return flat


def unflatten(tensors: Mapping[str, torch.Tensor], structure: Structure) -> Any:
    """The nested state ``flatten`` was given, its numbers Python numbers again; a missing leaf is an error."""

    def leaf(name: str) -> torch.Tensor:
        try:
            return tensors[name]
        except KeyError:
            raise CheckpointError(f"the state's leaf {name} is not in the checkpoint") from None

    def build(node: Structure) -> Any:
        (kind, value), *rest = node.items()
        if kind == "tensor":
            return leaf(value)
        if kind in ("bool", "int", "float"):
            return {"bool": bool, "int": int, "float": float}[kind](leaf(value).item())
        if kind in ("ints", "floats"):
            items = leaf(value).tolist()
            return tuple(items) if dict(rest)["container"] == "tuple" else items
        if kind in ("list", "tuple"):
            items = [build(child) for child in value]
            return tuple(items) if kind == "tuple" else items
        if kind == "dict":
            return {key: build(child) for key, child in value}
        return value

    return build(structure)


def nest(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Named leaves as nested dicts split at ``/`` (string keys): how a PyTree library sees the state."""
    tree: dict[str, Any] = {}
    for name, tensor in tensors.items():
        *parents, last = name.split(SEPARATOR)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = tensor
    return tree


def unnest(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of ``nest``: every leaf of nested dicts under its ``/``-joined name."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(unnest(value, f"{name}{SEPARATOR}"))
        else:
            flat[name] = value
    return flat
