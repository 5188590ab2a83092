"""oneDNN-packed linear layers: the same products as `nn.Linear`, in the shapes a verify forward has."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specserve.kernels.cpu_linear import PackedLinear, can_prepack, prepack_linears
from specserve.server.engine.target import load_model

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32, torch.device("cpu")),
                                reason="this torch build has no oneDNN packed linear")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 8), (2, 64)])
def test_packed_linear_matches_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    x = torch.randn(*shape, 96)
    with torch.inference_mode():
        packed = PackedLinear(linear)
        out = packed(x)
        expected = linear(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


PACKED_DTYPES = [torch.float32] + [torch.bfloat16] * can_prepack(torch.bfloat16, torch.device("cpu"))


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(dtype):
    # the engine relies on it: a token verified in a tree of 8 gets the bits it gets decoded alone
    torch.manual_seed(0)
    packed = PackedLinear(nn.Linear(576, 192).to(dtype))
    x = torch.randn(16, 576, dtype=dtype)
    with torch.inference_mode():
        alone = packed(x[:1])
        assert all(torch.equal(packed(x[:rows])[:1], alone) for rows in range(2, 17))


@pytest.mark.skipif(torch.bfloat16 not in PACKED_DTYPES, reason="this CPU has no native bfloat16 for oneDNN")
@pytest.mark.parametrize("rows", [1, 3, 8, 33])
def test_packed_bfloat16_gives_torchs_own_bits(rows):
    # packing bfloat16 changes the speed, not the model: the same products as torch's bfloat16 linear
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536).to(torch.bfloat16)
    x = torch.randn(rows, 576, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(PackedLinear(linear)(x), linear(x))


def test_prepack_linears_replaces_every_linear_and_keeps_the_rest():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4), nn.LayerNorm(4)))
    x = torch.randn(5, 8)
    with torch.inference_mode():
        expected = model(x)
        assert prepack_linears(model) == 2
        out = model(x)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model[2][1], nn.LayerNorm)
    assert not hasattr(model[0], "weight")  # the original weight is dropped, not kept twice
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_keep_weight_shares_the_original_weight():
    linear = nn.Linear(8, 16, bias=False)
    assert PackedLinear(linear, keep_weight=True).weight is linear.weight


def test_only_cpu_float32_and_native_bfloat16_are_packed():
    assert not can_prepack(torch.float64, torch.device("cpu"))
    assert not can_prepack(torch.float16, torch.device("cpu"))
    assert not can_prepack(torch.float32, torch.device("cuda"))
    assert not can_prepack(torch.bfloat16, torch.device("cuda"))
    assert can_prepack(torch.bfloat16, torch.device("cpu")) == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_load_model_packs_the_decoder_and_lm_head_only_when_asked(tiny_model_dirs):
    path = str(tiny_model_dirs["llava"])
    plain = load_model(path, "float32", "cpu")
    packed = load_model(path, "float32", "cpu", prepack=True)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    assert not any(isinstance(m, nn.Linear) for m in packed.decoder.modules())
    head = packed.model.get_output_embeddings()
    assert isinstance(head, PackedLinear)
    assert torch.equal(head.weight, plain.model.get_output_embeddings().weight)  # kept for EAGLE projections
    # the vision tower runs once per image and keeps torch's own linear layers
    assert any(isinstance(m, nn.Linear) for m in packed.model.model.vision_tower.modules())
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(packed.model(input_ids=ids).logits, plain.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, PackedLinear) for m in load_model(path, "float64", "cpu", True).model.modules())
