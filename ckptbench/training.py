"""The checkpoint a training job writes: fp16 weights, their fp32 master copy, AdamW's state from real steps.

The job is mixed precision as apex O2 and Megatron do it: the model runs in float16, AdamW updates a
float32 master copy of every weight and the model gets the master's cast after each step, so the
state is about 14 bytes a parameter (2 + 4 + 4 + 4), seven times the weights. A few steps on random
token batches (deterministic from the seed) make the moments real moments. The steps run with
deterministic kernels on one thread, so a resumed job can be compared with one that never stopped,
bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import pandas as pd
import psutil
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from . import manifest, stateful
from . import model as model_lib
from .errors import InsufficientMemoryError
from .pytree import Flat, Structure, flatten, unflatten

Payload = Literal["weights", "training"]
PAYLOADS: tuple[str, ...] = get_args(Payload)
BYTES_PER_PARAM = 2 + 4 + 4 + 4
"""float16 weights, float32 master copy, exp_avg and exp_avg_sq."""
STEP_BYTES_PER_PARAM = 4
"""What one step adds while it runs: the master's float32 gradients (each float16 one is freed once converted)."""


@dataclass(frozen=True)
class Recipe:
    """How the job trains: AdamW with linear warm-up, on batches of random tokens."""

    steps: int = 3
    batch: int = 2
    sequence: int = 16
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 100

    def lr_factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps)


@dataclass
class _Job:
    """A training job's live objects; ``state()`` is what it checkpoints (references, no copies)."""

    model: LlamaForCausalLM
    master: nn.Module
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int
    data: torch.Generator
    python: random.Random
    numpy: np.random.RandomState

    def state(self) -> dict:
        name, key, pos, has_gauss, cached = self.numpy.get_state()
        return {
            stateful.MODEL: self.model.state_dict(),
            stateful.MASTER: {n: p.detach() for n, p in self.master.named_parameters()},
            stateful.OPTIMIZER: self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": {
                "torch": self.data.get_state(),
                "python": self.python.getstate(),
                "numpy": {
                    "bit_generator": name,
                    "key": torch.from_numpy(key.astype(np.int64)),
                    "pos": int(pos),
                    "has_gauss": int(has_gauss),
                    "cached_gaussian": float(cached),
                },
            },
        }


def _model(config: LlamaConfig, weights: Mapping[str, torch.Tensor]) -> LlamaForCausalLM:
    """A float16 model whose parameters are ``weights`` themselves (no copy) and a fresh rotary buffer."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.load_state_dict(weights, assign=True, strict=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    return model


def _to_master(master: nn.Parameter, param: torch.Tensor) -> None:
    master.grad = param.grad.float()
    param.grad = None


def _job(config: LlamaConfig, recipe: Recipe, model: LlamaForCausalLM, master: Mapping[str, torch.Tensor]) -> _Job:
    """AdamW over the float32 master copy; each float16 gradient goes to it as soon as backward has made it."""
    module = stateful.master_module(master)
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(functools.partial(_to_master, module.get_parameter(name)))
    optimizer = stateful.adamw(
        module, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay, foreach=False
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor)
    return _Job(model, module, optimizer, scheduler, 0, torch.Generator(), random.Random(), np.random.RandomState())


def _start(preset: model_lib.Preset, seed: int, recipe: Recipe) -> _Job:
    weights = model_lib.build(preset, seed).tensors
    del weights[model_lib.ROTARY_BUFFER]  # not persistent: state_dict() leaves it out
    master = {name: tensor.float() for name, tensor in weights.items()}
    job = _job(preset.config(), recipe, _model(preset.config(), weights), master)
    job.data.manual_seed(seed)
    job.python.seed(seed)
    job.numpy.seed(seed)
    return job


def _resume(config: LlamaConfig, recipe: Recipe, state: dict) -> _Job:
    """A fresh job whose tensors are the loaded state's own (so resuming holds no second copy)."""
    job = _job(config, recipe, _model(config, state[stateful.MODEL]), state[stateful.MASTER])
    job.optimizer.load_state_dict(state[stateful.OPTIMIZER])
    job.scheduler.load_state_dict(state["scheduler"])
    job.step = state["step"]
    # A copy in torch's own memory: set_state crashed on a view into fastsafetensors' buffer.
    job.data.set_state(state["rng"]["torch"].clone())
    job.python.setstate(state["rng"]["python"])
    numpy = state["rng"]["numpy"]
    job.numpy.set_state(
        (
            numpy["bit_generator"],
            numpy["key"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    return job


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels on one thread: the same state and batch give the same bits every time."""
    enabled, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled)
        torch.set_num_threads(threads)


def _train(job: _Job, recipe: Recipe, steps: int) -> None:
    """``steps`` steps: float16 forward and backward, float32 gradients into AdamW, the master's cast back."""
    vocab = job.model.config.vocab_size
    with _deterministic():
        for _ in range(steps):
            tokens = torch.randint(vocab, (recipe.batch, recipe.sequence), generator=job.data)
            job.model(input_ids=tokens, labels=tokens).loss.backward()
            job.optimizer.step()
            job.optimizer.zero_grad(set_to_none=True)
            job.scheduler.step()
            with torch.no_grad():
                for name, param in job.model.named_parameters():
                    param.copy_(job.master.get_parameter(name))
            job.step += 1


def parameters(preset: model_lib.Preset) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(preset.config()).parameters())


def state_bytes(preset: model_lib.Preset) -> int:
    """The training state's size, from the preset's parameter count (the few scalars and RNG states aside)."""
    return parameters(preset) * BYTES_PER_PARAM


def needed_bytes(preset: model_lib.Preset, load_copies: float = 1.0) -> int:
    """Memory a training run holds at its peak: the state, a loaded copy (or more), and a step's gradients."""
    state = state_bytes(preset)
    return int(state * (1 + load_copies)) + state // BYTES_PER_PARAM * STEP_BYTES_PER_PARAM


def fits(preset: model_lib.Preset, memory: int | None = None) -> bool:
    return needed_bytes(preset) <= (psutil.virtual_memory().total if memory is None else memory)


def memory_text() -> str:
    return f"this machine's {psutil.virtual_memory().total / 2**30:.0f} GiB"


def presets_table() -> pd.DataFrame:
    """Every preset's weights and training state, and whether a training run fits in this machine's memory."""
    rows = {}
    for preset in model_lib.PRESETS.values():
        params = parameters(preset)
        rows[preset.name] = {
            "weights GB": round(params * 2 / 1e9, 3),
            "training state GB": round(params * BYTES_PER_PARAM / 1e9, 3),
            "training run needs GB": round(needed_bytes(preset) / 1e9, 2),
            "--payload training": "fits" if fits(preset) else "does not fit",
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def refuse_unless_fits(preset: model_lib.Preset) -> None:
    """One line naming the sizes when the training state and one loaded copy would not fit in memory now."""
    needed, available = needed_bytes(preset), psutil.virtual_memory().available
    if needed > available:
        raise InsufficientMemoryError(
            f"the {preset.name} training state ({state_bytes(preset) / 1e9:.1f} GB, with a loaded copy and a step)",
            needed,
            available,
        )


@dataclass
class TrainingCheckpoint:
    """The job's state after ``recipe.steps`` steps, flattened, and the run that never stopped one step later."""

    source: str
    config: LlamaConfig
    tensors: Flat
    params: int
    recipe: Recipe
    continued: dict[str, str] = field(repr=False)
    """The digest of every leaf after one more step of the job that was never interrupted."""

    @property
    def structure(self) -> Structure:
        return self.tensors.structure

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def build(preset: str | model_lib.Preset, seed: int = 0, recipe: Recipe | None = None) -> TrainingCheckpoint:
    """Train ``recipe.steps`` steps, copy the state (what is saved), and let the job take one more step.

    The copy is what lets the job go on: its digests after that step are what a resume must reproduce.
    """
    preset = model_lib.get_preset(preset) if isinstance(preset, str) else preset
    recipe = recipe or Recipe()
    refuse_unless_fits(preset)
    job = _start(preset, seed, recipe)
    _train(job, recipe, recipe.steps)
    live = flatten(job.state())
    saved = Flat((name, tensor.clone()) for name, tensor in live.items())
    saved.structure = live.structure
    del live
    _train(job, recipe, 1)
    continued = manifest.digests(flatten(job.state()))
    params = sum(p.numel() for p in job.model.parameters())
    return TrainingCheckpoint(
        f"preset {preset.name} (seed {seed}) trained {recipe.steps} AdamW steps",
        preset.config(),
        saved,
        params,
        recipe,
        continued,
    )


def resume_problem(checkpoint: TrainingCheckpoint, loaded: Mapping[str, torch.Tensor]) -> str | None:
    """Resume a fresh job from ``loaded``, take one step, and name the first leaf that differs from the run
    that never stopped; None when every leaf is equal bit for bit. The step changes ``loaded`` in place."""
    job = _resume(checkpoint.config, checkpoint.recipe, unflatten(loaded, checkpoint.structure))
    _train(job, checkpoint.recipe, 1)
    after = manifest.digests(flatten(job.state()))
    differing = [n for n in {**checkpoint.continued, **after} if after.get(n) != checkpoint.continued.get(n)]
    if not differing:
        return None
    return (
        f"after one more step, {len(differing)} leaves differ from the run that never stopped "
        f"(missing, extra or other bits), first {differing[0]}"
    )
