"""The EAGLE/MSD head: checkpoint round trip, EAGLE-1/MSD-layout folders, drafter inputs per image
mode (alignment with literal heads) and visual-token pooling."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import LlamaConfig

from specserve.drafting.eagle import EagleProposer, VocabProjection
from specserve.drafting.eagle_head import (
    HeadConfig,
    ImageMode,
    is_eagle_folder,
    load_head,
    new_head,
    save_head,
)
from specserve.drafting.eagle_inputs import image_runs, pool_run, prompt_entries
from specserve.kernels.weight_only import WeightOnlyLinear
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams

H = 8


def small_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=50, hidden_size=H, intermediate_size=16, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1)


def test_round_trip_keeps_weights_settings_and_outputs(tmp_path):
    settings = HeadConfig(image_mode=ImageMode.DECOUPLED_POOLED, pool_stride=4)
    head = new_head(small_config(), settings, seed=3)
    head.draft_vocab = torch.tensor([0, 3, 7, 49])
    save_head(head, tmp_path)
    loaded = load_head(tmp_path, small_config(), torch.float32, "cpu")
    assert loaded.settings == settings
    assert loaded.draft_vocab.tolist() == [0, 3, 7, 49] and loaded.draft_vocab.dtype == torch.long
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16).float()), key
    x = torch.randn(1, 5, H)
    mask = torch.zeros(1, 1, 5, 5).masked_fill_(~torch.ones(5, 5, dtype=torch.bool).tril(), -1e9)
    rounded = new_head(small_config(), settings)
    rounded.draft_vocab = torch.zeros(4, dtype=torch.long)
    rounded.load_state_dict(loaded.state_dict())
    torch.testing.assert_close(loaded(x, torch.arange(5)[None], mask), rounded(x, torch.arange(5)[None], mask))


def test_other_targets_of_another_size_are_refused(tmp_path):
    save_head(new_head(small_config(), HeadConfig()), tmp_path)
    with pytest.raises(ValueError, match="hidden size"):
        load_head(tmp_path, LlamaConfig(hidden_size=16, num_attention_heads=2), torch.float32, "cpu")


def write_eagle_layout(folder, text_config, intermediate: int = 48) -> None:
    """A checkpoint as EAGLE-1/MSD publish it: config.json of the base family with one layer, a
    pickled state dict with a biased fc, layer 0 without input_layernorm, the embedding and an old
    rotary buffer."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": text_config.hidden_size,
              "intermediate_size": intermediate, "num_attention_heads": text_config.num_attention_heads,
              "num_key_value_heads": text_config.num_key_value_heads, "num_hidden_layers": 1,
              "vocab_size": text_config.vocab_size, "rms_norm_eps": 1e-6}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    h = text_config.hidden_size
    kv = text_config.num_key_value_heads * (h // text_config.num_attention_heads)
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "fc.weight": (h, 2 * h), "fc.bias": (h,),
        "layers.0.self_attn.q_proj.weight": (h, h), "layers.0.self_attn.k_proj.weight": (kv, h),
        "layers.0.self_attn.v_proj.weight": (kv, h), "layers.0.self_attn.o_proj.weight": (h, h),
        "layers.0.mlp.gate_proj.weight": (intermediate, h), "layers.0.mlp.up_proj.weight": (intermediate, h),
        "layers.0.mlp.down_proj.weight": (h, intermediate), "layers.0.post_attention_layernorm.weight": (h,),
        "embed_tokens.weight": (text_config.vocab_size, h), "layers.0.self_attn.rotary_emb.inv_freq": (4,),
    }
    state = {key: torch.randn(shape, generator=gen, dtype=torch.float16) * 0.1 for key, shape in shapes.items()}
    torch.save(state, folder / "pytorch_model.bin")


def test_eagle_layout_checkpoint_loads_and_runs_losslessly(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llava"]
    base = Engine.from_config(EngineConfig(model=str(model_dir), dtype="float64"))
    write_eagle_layout(tmp_path / "msd-head", base.target.config)
    assert is_eagle_folder(tmp_path / "msd-head")
    assert not is_eagle_folder(model_dir)  # a plain HF model folder is a draft model, not a head
    engine = Engine.from_config(EngineConfig(model=str(model_dir), draft=str(tmp_path / "msd-head"), dtype="float64"))
    head = engine.proposer.head
    assert isinstance(engine.proposer, EagleProposer)
    assert head.settings == HeadConfig(ImageMode.DECOUPLED, input_norm=False, fc_bias=True)
    assert head.layer_config.intermediate_size == 48 and head.fc.weight.dtype == torch.float64
    image = Image.new("RGB", (32, 32), (20, 200, 30))
    prompt = engine.prepare_chat([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "a green square"}]}])
    out = engine.generate(prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    reference = base.generate(prompt, SamplingParams(max_tokens=20, ignore_eos=True))  # plain decoding
    assert out.token_ids == reference.token_ids


def literal_head(mode: ImageMode, keep: str) -> torch.nn.Module:
    """A head whose fc returns one half of its input: `keep` = "token" -> e(x_j), "feature" -> h_{j-1}."""
    head = new_head(small_config(), HeadConfig(image_mode=mode, pool_stride=2))
    eye, zero = torch.eye(H), torch.zeros(H, H)
    with torch.no_grad():
        head.fc.weight.copy_(torch.cat([eye, zero] if keep == "token" else [zero, eye], dim=1))
        head.fc.bias.zero_()
    return head


def entries_of(mode: ImageMode, keep: str):
    # tokens t0 t1 I2 I3 I4 I5 t6: a 2x2 image grid at positions 2..5 (the eagle_inputs docstring)
    embed = torch.nn.Embedding(50, H)
    ids = torch.tensor([3, 4, 49, 49, 49, 49, 7])
    image = ids == 49
    hidden = torch.randn(7, H)
    visual = torch.randn(7, H)
    inputs_embeds = torch.where(image[:, None], visual, embed(ids))
    with torch.no_grad():
        got = prompt_entries(literal_head(mode, keep), embed, ids, hidden, inputs_embeds, image)
    return got, embed, ids, hidden, inputs_embeds


@pytest.mark.parametrize("mode", list(ImageMode))
def test_prompt_entries_pair_feature_before_with_token_at(mode):
    got, embed, ids, hidden, visual = entries_of(mode, "feature")
    expected_sources = [1, -1, 6] if mode is ImageMode.DECOUPLED_POOLED else [1, 2, 3, 4, 5, 6]
    assert got.sources.tolist() == expected_sources
    for row, j in enumerate(expected_sources):
        if j == -1:
            torch.testing.assert_close(got.inputs[row], visual[2:6].mean(0))  # pooled visual, no fc
        elif mode.value.startswith("decoupled") and ids[j] == 49:
            torch.testing.assert_close(got.inputs[row], visual[j])  # decoupled: visual bypasses fc
        else:
            torch.testing.assert_close(got.inputs[row], hidden[j - 1])  # fc saw h_{j-1}


@pytest.mark.parametrize("mode, expected", [
    (ImageMode.TEXT_ONLY, "placeholder"), (ImageMode.FUSED, "visual"),
])
def test_prompt_entries_token_half_at_image_slots(mode, expected):
    got, embed, ids, hidden, inputs_embeds = entries_of(mode, "token")
    with torch.no_grad():
        want = embed(torch.tensor(49)) if expected == "placeholder" else inputs_embeds[2]
    torch.testing.assert_close(got.inputs[1], want)  # entry for position 2 consumed x_2 = <image>
    torch.testing.assert_close(got.inputs[5], embed.weight[7].detach())


def test_pool_run_grid_and_fallback():
    grid = torch.arange(16.0)[:, None]  # a 4x4 grid in raster order
    assert pool_run(grid, 2).squeeze(1).tolist() == [2.5, 4.5, 10.5, 12.5]
    line = torch.arange(6.0)[:, None]  # not a square: groups of stride^2 = 4, the last one shorter
    assert pool_run(line, 2).squeeze(1).tolist() == [1.5, 4.5]


def test_image_runs():
    assert image_runs(torch.tensor([0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)) == [(1, 3), (4, 5), (6, 7)]
    assert image_runs(torch.zeros(3, dtype=torch.bool)) == []


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_vocab_projection_renormalises_over_the_draft_vocabulary(softcap):
    lm_head = torch.nn.Linear(H, 50, bias=False)
    features = torch.randn(3, H)
    vocab = torch.tensor([1, 4, 30])
    with torch.no_grad():
        got = VocabProjection(lm_head, softcap, vocab, torch.float32).log_probs(features)
        full = lm_head(features)
        full = torch.tanh(full / softcap) * softcap if softcap else full
        everything = VocabProjection(lm_head, softcap, None, torch.float32).log_probs(features)
    torch.testing.assert_close(got[:, vocab], full[:, vocab].log_softmax(-1))
    outside = torch.ones(50, dtype=torch.bool)
    outside[vocab] = False
    assert torch.isneginf(got[:, outside]).all()
    torch.testing.assert_close(everything, full.log_softmax(-1))


@pytest.mark.parametrize("bits", [8, 4])
def test_vocab_projection_of_a_quantized_head_without_a_float_weight(bits):
    head = WeightOnlyLinear(torch.nn.Linear(64, 48, bias=False), bits)  # 64 / 48: int4's shape rules
    assert not hasattr(head, "weight")  # untied: no float copy is kept
    features, vocab = torch.randn(3, 64), torch.tensor([2, 7, 40])
    with torch.no_grad():
        got = VocabProjection(head, None, vocab, torch.float32).log_probs(features)
        reference = head(features)  # the kernel's own logits, with bfloat16 activations
    assert torch.isneginf(got[:, [i for i in range(48) if i not in vocab]]).all()
    torch.testing.assert_close(got[:, vocab], reference[:, vocab].log_softmax(-1), atol=0.05, rtol=0)
    # the rows read back are those the kernel multiplies by: the identity gives them exactly
    torch.testing.assert_close(head.dequantized_weight(vocab), head(torch.eye(64)).t()[vocab], rtol=0.01, atol=1e-6)
