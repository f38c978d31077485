"""The checkpoint under test: composition, dtypes, initialisation, determinism, validation."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch

from ckptbench import PRESETS, CompositionError, UnknownChoiceError, model
from ckptbench.model import ROTARY_BUFFER


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def test_tiny_has_238_tensors_named_as_the_config_defines(tiny):
    assert len(tiny.tensors) == 238
    # expected_names lists each layer's tensors in its own order, the model in module order: compare as sets
    names = list(tiny.tensors)
    assert len(set(names)) == len(names)
    assert sorted(names) == sorted(model.expected_names(tiny.config))
    assert names[-1] == ROTARY_BUFFER
    assert ROTARY_BUFFER in tiny.tensors
    assert tiny.params == sum(t.numel() for n, t in tiny.tensors.items() if n != ROTARY_BUFFER)
    assert tiny.nbytes == sum(t.numel() * t.element_size() for t in tiny.tensors.values())


def test_tiny_dtypes_inv_freq_float32_everything_else_float16(tiny):
    assert tiny.tensors[ROTARY_BUFFER].dtype == torch.float32
    others = {t.dtype for n, t in tiny.tensors.items() if n != ROTARY_BUFFER}
    assert others == {torch.float16}


def test_inv_freq_is_the_rotary_frequencies(tiny):
    inv_freq = tiny.tensors[ROTARY_BUFFER]
    head_dim = tiny.config.hidden_size // tiny.config.num_attention_heads
    assert inv_freq.shape == (head_dim // 2,)
    assert inv_freq[0].item() == 1.0
    assert bool((inv_freq[1:] < inv_freq[:-1]).all())


def test_norm_weights_are_ones_and_weights_have_std_002(tiny):
    norms = [t for n, t in tiny.tensors.items() if _is_norm(n)]
    assert len(norms) == 2 * tiny.config.num_hidden_layers + 1
    assert all(bool((t == 1).all()) for t in norms)
    weights = torch.cat(
        [t.float().flatten() for n, t in tiny.tensors.items() if not _is_norm(n) and n != ROTARY_BUFFER]
    )
    assert weights.numel() > 1_000_000
    assert abs(weights.mean().item()) < 1e-3
    assert 0.0195 < weights.std().item() < 0.0205


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_build_is_deterministic_per_seed_and_differs_across_seeds(tiny):
    again = model.build("tiny", seed=0)
    assert list(again.tensors) == list(tiny.tensors)
    assert all(_bits_equal(again.tensors[n], t) for n, t in tiny.tensors.items())
    other = model.build("tiny", seed=1)
    differing = [n for n, t in tiny.tensors.items() if not _bits_equal(other.tensors[n], t)]
    expected_differing = [n for n in tiny.tensors if not _is_norm(n) and n != ROTARY_BUFFER]
    assert differing == expected_differing


def test_validate_accepts_the_built_model(tiny):
    model.validate(tiny)


def test_validate_rejects_a_missing_tensor(tiny):
    tensors = OrderedDict(tiny.tensors)
    del tensors["model.layers.7.mlp.up_proj.weight"]
    with pytest.raises(CompositionError, match=r"model\.layers\.7\.mlp\.up_proj\.weight"):
        model.validate(dataclasses.replace(tiny, tensors=tensors))


def test_validate_rejects_an_unexpected_tensor(tiny):
    tensors = OrderedDict(tiny.tensors)
    tensors["model.extra.weight"] = torch.zeros(3, dtype=torch.float16)
    with pytest.raises(CompositionError, match=r"model\.extra\.weight"):
        model.validate(dataclasses.replace(tiny, tensors=tensors))


def test_validate_rejects_float16_inv_freq(tiny):
    tensors = OrderedDict(tiny.tensors)
    tensors[ROTARY_BUFFER] = tensors[ROTARY_BUFFER].to(torch.float16)
    with pytest.raises(CompositionError, match="float32"):
        model.validate(dataclasses.replace(tiny, tensors=tensors))


def test_validate_rejects_integer_tensors(tiny):
    tensors = OrderedDict(tiny.tensors)
    tensors["model.norm.weight"] = torch.ones(tiny.config.hidden_size, dtype=torch.int16)
    with pytest.raises(CompositionError, match="not floating point"):
        model.validate(dataclasses.replace(tiny, tensors=tensors))


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(UnknownChoiceError) as info:
        model.build("openllama-7b")
    assert info.value.kind == "preset"
    assert info.value.valid == list(PRESETS)
    for name in PRESETS:
        assert name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_build_does_not_depend_on_the_number_of_cores(tiny, monkeypatch):
    monkeypatch.setattr(model.os, "cpu_count", lambda: 1)
    serial = model.build("tiny", seed=0)
    assert all(_bits_equal(serial.tensors[n], t) for n, t in tiny.tensors.items())
