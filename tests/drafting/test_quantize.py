"""Int8 draft LMs: every Linear quantised, drafts close to the float model's, output unchanged."""

import pytest
import torch

from specserve.drafting.quantize import quantize_draft_model
from specserve.server.cli import build_parser, engine_config
from specserve.server.engine import Engine, load_draft_model
from specserve.server.engine.config import EngineConfig


def test_int8_draft_replaces_every_linear_and_keeps_the_logits_close(tiny_model_dirs):
    path = str(tiny_model_dirs["qwen2"])
    exact = load_draft_model(path, EngineConfig(model=path, dtype="float32"))
    int8 = load_draft_model(path, EngineConfig(model=path, dtype="float32", draft_quantization="int8"))
    assert not any(type(m) is torch.nn.Linear for m in int8.modules())
    assert isinstance(int8.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(int8.model.layers[0].mlp.down_proj, torch.ao.nn.quantized.dynamic.Linear)
    ids = torch.randint(0, exact.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = exact(input_ids=ids).logits, int8(input_ids=ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.05


def test_int8_needs_a_float32_model(tiny_model_dirs):
    path = str(tiny_model_dirs["qwen2"])
    model = load_draft_model(path, EngineConfig(model=path, dtype="bfloat16"))
    with pytest.raises(ValueError, match="float32"):
        quantize_draft_model(model)


def test_draft_quantization_is_validated(tiny_model_dirs):
    path = str(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match="draft_quantization must be one of"):
        EngineConfig(model=path, draft_quantization="int4")
    for draft in ("none", "ngram"):
        with pytest.raises(ValueError, match="applies to a draft LM"):
            Engine.from_config(EngineConfig(model=path, draft=draft, draft_quantization="int8"))


def test_cli_draft_quantization_flag():
    args = build_parser().parse_args(["generate", "--draft", "d", "--draft-quantization", "int8", "x"])
    assert engine_config(args).draft_quantization == "int8"
    assert engine_config(build_parser().parse_args(["generate", "x"])).draft_quantization == "none"
