"""The checkpoint under test: OpenLLaMA-shaped weights, built offline and fast.

A checkpoint is the model's 237 parameters plus the rotary ``inv_freq`` buffer (238 tensors).
The buffer is non-persistent, so ``state_dict()`` omits it; it is added explicitly and kept
float32 because float16 would change its values.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .errors import CompositionError, ModelSourceError, UnknownChoiceError
from .strategies import total_bytes

ROTARY_BUFFER = "model.rotary_emb.inv_freq"
_LAYER_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


@dataclass(frozen=True)
class Preset:
    """One member of the OpenLLaMA shape family."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    description: str

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            rms_norm_eps=1e-6,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("openllama-3b", 32000, 3200, 8640, 26, 32, "OpenLLaMA-3B: 3.43 B parameters, 6.85 GB fp16"),
        Preset("openllama-3b-2l", 32000, 3200, 8640, 2, 32, "OpenLLaMA-3B widths, 2 layers: ~0.45 B parameters"),
        Preset("tiny", 2000, 136, 360, 26, 4, "26 layers of small widths, not multiples of 64: 6.3 M parameters"),
    )
}
DEFAULT_PRESET = "openllama-3b"


@dataclass
class ModelCheckpoint:
    """An ordered mapping name -> tensor, plus where it came from."""

    source: str
    config: LlamaConfig
    tensors: OrderedDict[str, torch.Tensor]

    @property
    def params(self) -> int:
        return sum(t.numel() for name, t in self.tensors.items() if name != ROTARY_BUFFER)

    @property
    def nbytes(self) -> int:
        return total_bytes(self.tensors)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownChoiceError("preset", name, list(PRESETS)) from None


def expected_names(config: LlamaConfig) -> list[str]:
    """The tensor names a Llama checkpoint must hold, derived from its config."""
    names = ["model.embed_tokens.weight"]
    for layer in range(config.num_hidden_layers):
        names += [f"model.layers.{layer}.{suffix}" for suffix in _LAYER_TENSORS]
    names.append("model.norm.weight")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return [*names, ROTARY_BUFFER]


def validate(checkpoint: ModelCheckpoint) -> None:
    """Check count and composition rather than assume them."""
    expected = expected_names(checkpoint.config)
    got = list(checkpoint.tensors)
    if sorted(got) != sorted(expected):
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        raise CompositionError(
            f"{checkpoint.source}: expected {len(expected)} tensors, got {len(got)} "
            f"(missing {missing}, unexpected {extra})"
        )
    inv_freq = checkpoint.tensors[ROTARY_BUFFER]
    if inv_freq.dtype != torch.float32:
        raise CompositionError(f"{checkpoint.source}: {ROTARY_BUFFER} must be float32, is {inv_freq.dtype}")
    for name, tensor in checkpoint.tensors.items():
        if not tensor.is_floating_point():
            raise CompositionError(f"{checkpoint.source}: {name} is {tensor.dtype}, not floating point")


def _rotary_inv_freq(config: LlamaConfig) -> torch.Tensor:
    return LlamaRotaryEmbedding(config).inv_freq.to(torch.float32).contiguous()


def _collect(source: str, model: LlamaForCausalLM) -> ModelCheckpoint:
    tensors = OrderedDict((name, p.detach()) for name, p in model.named_parameters())
    tensors[ROTARY_BUFFER] = _rotary_inv_freq(model.config)
    checkpoint = ModelCheckpoint(source, model.config, tensors)
    validate(checkpoint)
    return checkpoint


def _meta_model(preset: Preset, dtype: torch.dtype) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(preset.config()).to(dtype)


def _seeds(seed: int, count: int) -> np.ndarray:
    return np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64)


def _draw(name: str, tensor: torch.Tensor, seed: np.uint64) -> None:
    with torch.no_grad():
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(int(seed)))


def build(preset: str | Preset = DEFAULT_PRESET, seed: int = 0, dtype: torch.dtype = torch.float16) -> ModelCheckpoint:
    """Random normal(0, 0.02) weights and unit norms, deterministic from ``seed``.

    The module is created on the meta device and materialised empty, which skips Hugging Face's
    initialisation (minutes for 3B parameters on two cores); the weights are then drawn in place,
    one generator per tensor so every core draws and the result does not depend on their number.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    model = _meta_model(preset, dtype)
    model.to_empty(device="cpu")
    params = list(model.named_parameters())
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_draw, *zip(*params, strict=True), _seeds(seed, len(params))))
    model.model.rotary_emb.inv_freq = _rotary_inv_freq(model.config)
    return _collect(f"preset {preset.name} (seed {seed})", model)


def build_each(
    preset: str | Preset = DEFAULT_PRESET, seed: int = 0, dtype: torch.dtype = torch.float16
) -> tuple[ModelCheckpoint, Iterator[tuple[str, torch.Tensor]]]:
    """The model's shapes (weights on the meta device) and ``build``'s tensors one at a time, bit for bit.

    A rank keeps its rows of each tensor and drops the rest, so it never holds the whole model:
    its peak is its shard plus the largest tensor, at the cost of drawing every tensor on every rank.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    model = _meta_model(preset, dtype)
    shapes = _collect(f"preset {preset.name} (seed {seed})", model)
    params = list(model.named_parameters())

    def each() -> Iterator[tuple[str, torch.Tensor]]:
        for (name, param), tensor_seed in zip(params, _seeds(seed, len(params)), strict=True):
            tensor = torch.empty(param.shape, dtype=param.dtype)
            _draw(name, tensor, tensor_seed)
            yield name, tensor
        yield ROTARY_BUFFER, shapes.tensors[ROTARY_BUFFER]

    return shapes, each()


def load_local(path: str | Path) -> ModelCheckpoint:
    """Real weights from a local Hugging Face directory (config + safetensors), never the network."""
    directory = Path(path)
    if not directory.is_dir():
        what = "is a file, not a folder" if directory.exists() else "does not exist"
        raise ModelSourceError(f"model directory {directory} {what}")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{directory} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelSourceError(f"{config_file} is not valid JSON: {err}") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "llama":
        raise ModelSourceError(f"{directory} holds a {model_type!r} model; ckptbench reads Llama-family models")
    if not any(directory.glob("*.safetensors")):
        raise ModelSourceError(f"{directory} has no *.safetensors weights")
    try:
        model, info = LlamaForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype="auto", output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelSourceError(f"cannot load weights from {directory}: {err}") from err
    # transformers fills missing weights with fresh random values and only logs it.
    incomplete = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if incomplete:
        raise ModelSourceError(f"{directory}: weights do not match the config: {incomplete}")
    return _collect(str(directory), model)
