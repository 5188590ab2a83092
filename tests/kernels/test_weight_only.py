"""Weight-only int8 / int4 linear layers: the products of the quantized weights they claim to hold,
rows independent of each other, GGUF Q4_1 codes recovered, and a target loaded quantized."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from specserve.kernels.weight_only import (
    ACTIVATIONS,
    GROUP,
    WeightOnlyLinear,
    can_quantize,
    quantize_int4,
    quantize_int8,
    quantize_linears,
)
from specserve.server.cli import build_parser
from specserve.server.engine.args import engine_config
from specserve.server.engine.config import EngineConfig
from specserve.server.engine.target import load_model


def dequantized(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The float weight a `WeightOnlyLinear` stands for, from the quantizers and the bfloat16 rounding of
    its scales (the layer itself keeps only packed codes)."""
    if bits == 8:
        codes, scales = quantize_int8(weight)
        return codes.float() * scales.to(ACTIVATIONS).float()[:, None]
    codes, scales, minimums = quantize_int4(weight)
    out, groups = weight.shape[0], weight.shape[1] // GROUP
    scales_r = scales.to(ACTIVATIONS).float()
    zeros_r = (minimums + 8 * scales).to(ACTIVATIONS).float()
    per_group = (codes.float().reshape(out, groups, GROUP) - 8) * scales_r[..., None] + zeros_r[..., None]
    return per_group.reshape(out, groups * GROUP)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 16)])
def test_products_are_those_of_the_quantized_weight(bits, bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(96, 48, bias=bias)
    x = torch.randn(*shape, 96)
    with torch.inference_mode():
        out = WeightOnlyLinear(linear, bits)(x)
        weight = dequantized(linear.weight, bits)
        expected = nn.functional.linear(x.to(ACTIVATIONS).float(), weight, linear.bias)
    assert out.shape == expected.shape and out.dtype == x.dtype
    # the kernels round their output to bfloat16 (8 bits of mantissa)
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_within_half_a_step(bits):
    torch.manual_seed(1)
    weight = torch.randn(32, 64)
    if bits == 8:
        codes, scales = quantize_int8(weight)
        assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
        assert ((codes.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-6).all()
    else:
        codes, scales, minimums = quantize_int4(weight)
        assert int(codes.min()) == 0 and int(codes.max()) == 15
        values = codes.float().reshape(32, 2, GROUP) * scales[..., None] + minimums[..., None]
        assert ((values - weight.reshape(32, 2, GROUP)).abs() <= scales[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(bits):
    # the engine relies on it: a token verified in a tree of 8 gets the bits it gets decoded alone
    torch.manual_seed(0)
    layer = WeightOnlyLinear(nn.Linear(576, 192), bits)
    x = torch.randn(16, 576)
    with torch.inference_mode():
        alone = layer(x[:1])
        assert all(torch.equal(layer(x[:rows])[:1], alone) for rows in range(2, 17))


def q4_1_blocks(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_1 blocks of 32 values (float16 scale, float16 minimum, 16 bytes of nibbles: values 0-15
    in the low nibbles, 16-31 in the high ones): (codes [rows, 32 * blocks], scales, minimums)."""
    blocks = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_1).reshape(data.shape[0], -1, 20)
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    minimums = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:20]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(data.shape[0], -1)
    return codes, scales, minimums


def test_a_gguf_q4_1_weight_gets_its_own_codes_back():
    # the store serves a Q4_1 file dequantized; int4 quantization recovers the file's 4-bit codes
    data = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    codes, scales, minimums = q4_1_blocks(data)
    values = gguf.quants.dequantize(gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_1),
                                    gguf.GGMLQuantizationType.Q4_1)
    ours, our_scales, our_minimums = quantize_int4(torch.from_numpy(values))
    assert np.array_equal(ours.numpy(), codes)
    np.testing.assert_allclose(our_scales.numpy(), scales, rtol=1e-5)
    np.testing.assert_allclose(our_minimums.numpy(), minimums, rtol=1e-6)


def test_quantize_linears_takes_what_the_kernels_can_and_keeps_the_rest():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 8), nn.LayerNorm(8)))
    assert quantize_linears(model, 4) == 1  # 8 output features: not a multiple of 16
    assert isinstance(model[0], WeightOnlyLinear) and isinstance(model[2][0], nn.Linear)
    assert not hasattr(model[0], "weight")  # only the packed codes are kept
    assert quantize_linears(model, 8) == 1 and isinstance(model[2][0], WeightOnlyLinear)
    assert isinstance(model[2][1], nn.LayerNorm)


def test_layers_off_the_cpu_or_off_the_shape_rules_are_refused():
    assert not can_quantize(nn.Linear(64, 32, device="meta"), 8)
    assert not can_quantize(nn.Linear(48, 32), 4)  # 48 input features: not whole groups of 32
    with pytest.raises(ValueError, match="no int4 CPU kernel for a 8x64 linear"):
        WeightOnlyLinear(nn.Linear(64, 8), 4)


def test_keep_weight_shares_the_original_weight():
    linear = nn.Linear(32, 16, bias=False)
    assert WeightOnlyLinear(linear, 8, keep_weight=True).weight is linear.weight


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_target_loads_quantized_and_predicts_like_its_float_self(tiny_model_dirs, quantization):
    path = str(tiny_model_dirs["llama"])
    plain = load_model(path, "float32", "cpu", prepack=False)
    quantized = load_model(path, "float32", "cpu", prepack=True, quantization=quantization)
    layers = [m for m in quantized.decoder.modules() if isinstance(m, WeightOnlyLinear)]
    assert layers and not any(isinstance(m, nn.Linear) for m in quantized.decoder.modules())
    assert {m.bits for m in layers} == {4 if quantization == "int4" else 8}
    head = quantized.model.get_output_embeddings()
    # the tiny model's head is untied: no float copy of it is kept (a tied one is tested below)
    assert isinstance(head, WeightOnlyLinear) and head.bits == 8 and not hasattr(head, "weight")
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.inference_mode():
        a, b = plain.model(ids).logits, quantized.model(ids).logits
    # a quantized model is a slightly different model: close logits, not equal ones
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98


def test_a_tied_head_keeps_the_embeddings_weight(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), "float32", "cpu", quantization="int8").model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("bits", [8, 4])
def test_the_dequantized_weight_is_the_weight_the_kernel_multiplies_by(bits):
    linear = nn.Linear(64, 48, bias=False)
    layer, rows = WeightOnlyLinear(linear, bits), torch.tensor([0, 5, 47])
    reference = dequantized(linear.weight.detach(), bits)
    # int8: exact; int4 is read back through the kernel, whose bfloat16 output rounds each weight
    tolerance = {"rtol": 0, "atol": 0} if bits == 8 else {"rtol": 0.01, "atol": 1e-6}
    torch.testing.assert_close(layer.dequantized_weight(), reference, **tolerance)
    torch.testing.assert_close(layer.dequantized_weight(rows), reference[rows], **tolerance)


def test_the_cli_flag_reaches_the_config_and_bad_values_are_refused():
    args = build_parser().parse_args(["serve", "--quantization", "int4"])
    assert engine_config(args).quantization == "int4"
    assert engine_config(build_parser().parse_args(["generate", "x"])).quantization == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "int3"])
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(model="m", quantization="fp8")


def test_a_quantized_target_off_the_cpu_is_refused_before_loading(tmp_path):
    # no folder at tmp_path: the refusal comes before any file is read
    with pytest.raises(ValueError, match="--quantization int4 runs on CPU only"):
        load_model(str(tmp_path / "absent"), "float32", "cuda", quantization="int4")
