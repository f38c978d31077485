"""Bad inputs each get their own error: missing or damaged checkpoints, unusable model directories."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import LlamaForCausalLM

from ckptbench import CheckpointError, ModelSourceError, get_strategy, model
from ckptbench.manifest import MANIFEST
from ckptbench.model import ROTARY_BUFFER

from conftest import load_checkpoint

TENSOR = "model.layers.3.self_attn.q_proj.weight"


def _copy(saved, name, tmp_path):
    """A private copy of a session checkpoint, to damage."""
    return shutil.copytree(saved[name].path, tmp_path / name)


@pytest.mark.parametrize("name", ["pytorch", "tensorstore", "ts+ocdbt", "t5x"])
def test_missing_checkpoint_directory(name, tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "absent")):
        load_checkpoint(get_strategy(name), tmp_path / "absent")


@pytest.mark.parametrize("name", ["pytorch", "tensorstore", "ts+ocdbt", "ts+float16"])
def test_a_checkpoint_without_its_manifest_is_not_complete(name, saved, tmp_path):
    path = _copy(saved, name, tmp_path)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="not a complete ckptbench checkpoint"):
        load_checkpoint(get_strategy(name), path)


@pytest.mark.parametrize("text", ["{not json", '{"format": "other"}', '{"format": "ckptbench-checkpoint/1"}'])
def test_malformed_manifest(text, saved, tmp_path):
    path = _copy(saved, "tensorstore", tmp_path)
    (path / MANIFEST).write_text(text)
    with pytest.raises(CheckpointError, match="malformed manifest"):
        load_checkpoint(get_strategy("tensorstore"), path)


def test_a_checkpoint_of_another_kvstore_is_refused(saved):
    with pytest.raises(CheckpointError, match="written as tensorstore"):
        load_checkpoint(get_strategy("ts+ocdbt"), saved["tensorstore"].path)


@pytest.mark.parametrize("name", ["tensorstore", "ts+compression"])
def test_truncated_chunk_file_names_the_tensor(name, saved, tmp_path):
    path = _copy(saved, name, tmp_path)
    chunk = path / TENSOR / "0.0"
    data = chunk.read_bytes()
    assert len(data) > 8
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=TENSOR.replace(".", r"\.")):
        load_checkpoint(get_strategy(name), path)


def test_missing_tensor_array_names_the_tensor(saved, tmp_path):
    path = _copy(saved, "tensorstore", tmp_path)
    shutil.rmtree(path / TENSOR)
    with pytest.raises(CheckpointError, match=TENSOR.replace(".", r"\.")):
        load_checkpoint(get_strategy("tensorstore"), path)


def test_a_deleted_chunk_is_refused_not_read_as_zeros(saved, tmp_path):
    path = _copy(saved, "tensorstore", tmp_path)
    (path / TENSOR / "0.0").unlink()
    with pytest.raises(CheckpointError, match=re.escape(TENSOR) + ".*NOT_FOUND"):
        load_checkpoint(get_strategy("tensorstore"), path)


def test_truncated_torch_file(saved, tmp_path):
    path = _copy(saved, "pytorch", tmp_path)
    file = path / "model.pt"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable pytorch checkpoint"):
        load_checkpoint(get_strategy("pytorch"), path)


def test_torch_directory_without_its_file(saved, tmp_path):
    path = _copy(saved, "pytorch", tmp_path)
    (path / "model.pt").unlink()
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        load_checkpoint(get_strategy("pytorch"), path)


# --- model.load_local -------------------------------------------------------------------------------------------


def test_load_local_missing_directory(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        model.load_local(tmp_path / "absent")


def test_load_local_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match=r"config\.json"):
        model.load_local(tmp_path)


def test_load_local_bad_json_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelSourceError, match="not valid JSON"):
        model.load_local(tmp_path)


def test_load_local_not_a_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="gpt2"):
        model.load_local(tmp_path)


def test_load_local_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="safetensors"):
        model.load_local(tmp_path)


def test_load_local_config_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ModelSourceError):
        model.load_local(tmp_path)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny-preset Llama saved by transformers itself (float16, safetensors), and its parameters."""
    config = model.get_preset("tiny").config()
    torch.manual_seed(1234)
    hf_model = LlamaForCausalLM(config).to(torch.float16)
    directory = tmp_path_factory.mktemp("hf-tiny")
    hf_model.save_pretrained(directory, safe_serialization=True)
    return directory, {name: p.detach().clone() for name, p in hf_model.named_parameters()}


def test_load_local_reads_a_save_pretrained_model(pretrained):
    directory, parameters = pretrained
    assert list(directory.glob("*.safetensors"))
    checkpoint = model.load_local(directory)
    assert checkpoint.source == str(directory)
    assert len(checkpoint.tensors) == 238
    assert sorted(checkpoint.tensors) == sorted(model.expected_names(checkpoint.config))
    assert checkpoint.tensors[ROTARY_BUFFER].dtype == torch.float32
    assert set(parameters) == set(checkpoint.tensors) - {ROTARY_BUFFER}
    for name, want in parameters.items():
        got = checkpoint.tensors[name]
        assert got.dtype == want.dtype == torch.float16, name
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name


def test_load_local_refuses_missing_weights(pretrained, tmp_path):
    from safetensors.torch import load_file, save_file

    source, _ = pretrained
    directory = shutil.copytree(source, tmp_path / "incomplete")
    weights = load_file(directory / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match="up_proj"):
        model.load_local(directory)
