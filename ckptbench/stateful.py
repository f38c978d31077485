"""A training state as the live objects checkpoint libraries' stateful APIs take: a module and its AdamW.

DCP's ``get_state_dict(model, optimizer)`` names an optimizer's state by the parameters' places in the
module it updates. In a mixed-precision job that module is the float32 master copy, so the job and the
DCP strategy build it the same way: from the state's own tensors, without copying them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

MODEL, MASTER, OPTIMIZER = "model", "master", "optimizer"
"""The training state's keys for the float16 weights, their float32 master copy and AdamW's state dict."""


def master_module(master: Mapping[str, torch.Tensor]) -> nn.Module:
    """Each tensor (no copy) a parameter at its dotted name, in the mapping's order."""
    root = nn.Module()
    for name, tensor in master.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in dict(module.named_children()):
                module.add_module(part, nn.Module())
            module = module.get_submodule(part)
        module.register_parameter(leaf, nn.Parameter(tensor))
    return root


def adamw(module: nn.Module, state: Mapping[str, Any] | None = None, **settings: Any) -> torch.optim.AdamW:
    """AdamW over ``module``'s parameters in their order, holding ``state`` (its state dict) when given.

    Loading a state of the parameters' dtype and device keeps its tensors themselves: no copy.
    """
    optimizer = torch.optim.AdamW(module.parameters(), **settings)
    if state is not None:
        optimizer.load_state_dict(state)
    return optimizer
