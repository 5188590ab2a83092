"""oneDNN-packed linear layers: the same products as `nn.Linear`, in the shapes a verify forward has."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specserve.kernels.cpu_linear import (
    HalfLinear,
    PackedLinear,
    can_pack_half,
    can_prepack,
    invariant_row_counts,
    packed_linear_class,
    prepack_linears,
)
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


CPU = torch.device("cpu")
needs_half = pytest.mark.skipif(not can_pack_half(torch.float16, CPU), reason="no fbgemm half-precision GEMM (AVX2)")


def half_exact(linear: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    """`linear` in `dtype` with weights float16 holds exactly (as a real bfloat16 checkpoint's are;
    random ones hold values below float16's normal range)."""
    with torch.no_grad():
        linear.weight.copy_(linear.weight.half().float() * (linear.weight.abs() > 1e-4))
    return linear.to(dtype)


@needs_half
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_half_linear_is_the_float32_product_of_its_weights(dtype, bias):
    torch.manual_seed(0)
    linear = half_exact(nn.Linear(96, 40, bias=bias), dtype)
    x = torch.randn(2, 5, 96, dtype=dtype)
    with torch.inference_mode():
        out = HalfLinear(linear)(x)
    bias = None if linear.bias is None else linear.bias.float()
    expected = nn.functional.linear(x.float(), linear.weight.float(), bias)
    assert out.shape == (2, 5, 40) and out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype))  # float32 sums in another order, rounded once to dtype


@needs_half
def test_half_linear_gives_a_row_the_same_bits_whatever_rows_run_beside_it():
    # fbgemm computes blocks of 1 or 2 rows with other kernels than larger blocks: the padding to an
    # invariant row count is what makes a token verified in a tree of 8 get the bits it gets alone
    assert invariant_row_counts()[-1] > 256  # on this project's AVX2 machine 370 of 1-512: not 1, 2, 7, 14, 31, 32, ...
    torch.manual_seed(0)
    for features in [576, 1536]:
        packed = HalfLinear(half_exact(nn.Linear(features, 192), torch.bfloat16))
        x = torch.randn(1100, features)  # float32 rows: every bit of a sum's order shows (bfloat16 rows hide some)
        with torch.inference_mode():
            whole = packed(x)  # past the largest probed count: pieces
            assert all(torch.equal(packed(x[:rows]), whole[:rows]) for rows in [*range(1, 40), 255, 509, 511, 700])
            assert all(torch.equal(packed(x[row : row + 1]), whole[row : row + 1]) for row in range(0, 1100, 97))


@needs_half
def test_a_weight_float16_cannot_hold_keeps_torchs_linear():
    model = nn.Sequential(half_exact(nn.Linear(8, 16), torch.bfloat16), nn.Linear(16, 4).to(torch.bfloat16))
    with torch.no_grad():
        model[1].weight[0, 0] = 1e5  # beyond float16's range
    assert not HalfLinear.fits(model[1])
    with pytest.raises(ValueError, match="exactly"):
        HalfLinear(model[1])
    assert prepack_linears(model, HalfLinear) == 1
    assert isinstance(model[0], HalfLinear) and isinstance(model[1], nn.Linear)


def test_packed_linear_class_picks_onednn_where_it_applies_then_fbgemm():
    assert packed_linear_class(torch.float32, CPU) is PackedLinear
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert packed_linear_class(torch.bfloat16, CPU) is (PackedLinear if native else HalfLinear
                                                         if can_pack_half(torch.bfloat16, CPU) else None)
    assert packed_linear_class(torch.float16, CPU) is (HalfLinear if can_pack_half(torch.float16, CPU) else None)
    assert packed_linear_class(torch.float64, CPU) is None
    assert packed_linear_class(torch.float16, torch.device("cuda")) is None


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
