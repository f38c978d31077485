"""check_identical() compares names, order, dtypes, shapes and stored bits, and names what differs."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from ckptbench import VerificationError
from ckptbench.bitwise import check_identical
from ckptbench.model import ROTARY_BUFFER

TENSOR = "model.layers.5.mlp.down_proj.weight"


@pytest.fixture
def copy(tiny) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((name, t.clone()) for name, t in tiny.tensors.items())


def test_an_exact_copy_verifies(tiny, copy):
    check_identical(copy, tiny.tensors, "copy")


def test_missing_tensor(tiny, copy):
    del copy[TENSOR]
    with pytest.raises(VerificationError, match=r"missing \['model\.layers\.5\.mlp\.down_proj\.weight'\]"):
        check_identical(copy, tiny.tensors, "copy")


def test_extra_tensor(tiny, copy):
    copy["model.extra"] = torch.zeros(1)
    with pytest.raises(VerificationError, match=r"model\.extra"):
        check_identical(copy, tiny.tensors, "copy")


def test_reordered_tensors(tiny, copy):
    copy.move_to_end("model.embed_tokens.weight")
    with pytest.raises(VerificationError, match="order"):
        check_identical(copy, tiny.tensors, "copy")


def test_wrong_dtype(tiny, copy):
    copy[TENSOR] = copy[TENSOR].float()
    with pytest.raises(VerificationError, match=rf"{TENSOR} is torch.float32"):
        check_identical(copy, tiny.tensors, "copy")


def test_wrong_dtype_of_inv_freq(tiny, copy):
    copy[ROTARY_BUFFER] = copy[ROTARY_BUFFER].half()
    with pytest.raises(VerificationError, match="inv_freq"):
        check_identical(copy, tiny.tensors, "copy")


def test_wrong_shape(tiny, copy):
    copy[TENSOR] = copy[TENSOR].t().contiguous()
    with pytest.raises(VerificationError, match=TENSOR):
        check_identical(copy, tiny.tensors, "copy")


def test_flipped_sign_of_zero_is_caught_through_the_bits():
    expected = {"w": torch.tensor([0.0, 1.0, 2.0], dtype=torch.float16)}
    loaded = {"w": torch.tensor([-0.0, 1.0, 2.0], dtype=torch.float16)}
    assert torch.equal(loaded["w"], expected["w"])  # equal as numbers...
    with pytest.raises(VerificationError, match="w differs from what was saved in 1 elements"):
        check_identical(loaded, expected, "zeros")  # ...but not as stored bits


def test_one_flipped_bit(tiny, copy):
    bits = copy[TENSOR].view(torch.int16)
    bits[17, 4] ^= 1
    with pytest.raises(VerificationError, match=rf"{TENSOR} differs from what was saved in 1 elements"):
        check_identical(copy, tiny.tensors, "copy")


def test_nan_payloads_differ():
    quiet = torch.tensor([0x7E00], dtype=torch.int16).view(torch.float16)
    other = torch.tensor([0x7E01], dtype=torch.int16).view(torch.float16)
    check_identical({"n": quiet.clone()}, {"n": quiet}, "nan")
    with pytest.raises(VerificationError):
        check_identical({"n": other}, {"n": quiet}, "nan")


def test_the_source_is_named(tiny, copy):
    del copy[TENSOR]
    with pytest.raises(VerificationError, match=r"^somewhere/ckpt: "):
        check_identical(copy, tiny.tensors, "somewhere/ckpt")


def test_a_flipped_bit_past_the_first_block_of_a_large_tensor():
    """Tensors over 64 MiB are compared in blocks; the last byte of the last block counts too."""
    want = torch.arange(40_000_000, dtype=torch.int32).view(torch.float32)
    got = want.clone()
    got.view(torch.int32)[-1] ^= 1 << 31
    check_identical({"w": want.clone()}, {"w": want}, "large")
    with pytest.raises(VerificationError, match="w differs from what was saved in 1 elements"):
        check_identical({"w": got}, {"w": want}, "large")
