"""Greedy losslessness: speculative output == the target's own `generate(do_sample=False)`, token for
token, in float64, for several model families and every drafter (a wrong-token drafter included)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from specserve.drafting.base import DraftContext, DraftProposal, SequentialProposer
from specserve.drafting.budget import TreeBudget, TreeMode
from specserve.drafting.eagle_head import ImageMode
from specserve.kernels.cpu_linear import HalfLinear, can_pack_half
from specserve.kernels.tree import DraftTree
from specserve.kernels.weight_only import WeightOnlyLinear
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.outputs import image_tensors

PROMPTS = [
    "the quick brown fox",
    "def add(a, b):",
    "Summarise: the cat sat on the mat. The mat was red.",
    "a red circle, a blue square and a green triangle. a red circle, a blue",
]


class WrongTokenProposer(SequentialProposer):
    """Proposes a full tree of random tokens: nearly every node is rejected, which exercises the
    rejection paths (and the rare accidental accept). An embedder's own drafter: `SequentialProposer`
    supplies the batch interface."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)
        self.device = torch.device("cpu")

    def open(self, context: DraftContext) -> WrongTokenProposer:
        return self

    def propose(self, root_token: int) -> DraftProposal:
        tokens = torch.randint(0, self.vocab, (1, 7), generator=self.gen)
        tokens[0, 0] = root_token
        parents = torch.tensor([[-1, 0, 0, 1, 1, 3, 2]])
        return DraftProposal(DraftTree.from_parents(tokens, parents))

    def commit(self, tokens, hidden) -> None:
        pass

    def close(self) -> None:
        pass


def reference_greedy(engine: Engine, prompt, max_new: int) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    kwargs = image_tensors(prompt.images, "cpu", torch.float64)
    out = engine.target.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
        **kwargs,
    )
    return out[0, ids.shape[1]:].tolist()


def engine_for(path, draft: str = "none", tree: TreeBudget = TreeBudget(), proposer=None,
               draft_quantization: str = "none", quantization: str = "none") -> Engine:
    # batch_tree_tokens=0: every proposal is verified whole, so the drafters' accepted counts checked
    # here do not depend on the batch planner's measured costs
    config = EngineConfig(model=str(path), draft=draft, dtype="float64", tree=tree,
                          draft_quantization=draft_quantization, batch_tree_tokens=0, quantization=quantization)
    if proposer is None:
        return Engine.from_config(config)
    base = Engine.from_config(EngineConfig(model=str(path), dtype="float64"))
    return Engine(config, base.target, base.tokenizer, base.prompts.processor, proposer=proposer)


def assert_greedy_equal(engine: Engine, max_new: int = 40) -> None:
    params = SamplingParams(max_tokens=max_new)
    for text in PROMPTS:
        prompt = engine.prepare_text(text)
        out = engine.generate(prompt, params)
        expected = reference_greedy(engine, prompt, max_new)
        assert out.token_ids == expected, text
        assert out.finish_reason == ("length" if len(expected) == max_new else "stop")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("draft", ["none", "ngram", "suffix", "self:1"])
def test_greedy_matches_generate(tiny_model_dirs, family, draft):
    assert_greedy_equal(engine_for(tiny_model_dirs[family], draft))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("draft", ["ngram", "self:1", "model", "eagle"])
def test_greedy_quantized_target_matches_its_own_decoding(tiny_model_dirs, random_head_dir, quantization, draft):
    """Lossless with respect to the quantized model: `generate` runs the same quantized layers. The
    EAGLE head reads the rows of its draft vocabulary back from the int8 head (untied: no float copy)."""
    spec = {"model": str(tiny_model_dirs["qwen2"]),  # a real but imperfect drafter
            "eagle": str(random_head_dir(tiny_model_dirs["llama"], ImageMode.DECOUPLED, list(range(0, 300, 2))))
            }.get(draft, draft)
    engine = engine_for(tiny_model_dirs["llama"], spec, quantization=quantization)
    assert any(isinstance(m, WeightOnlyLinear) for m in engine.target.model.modules())
    assert_greedy_equal(engine)


@pytest.mark.parametrize("mode", [TreeMode.CHAIN, TreeMode.DYNAMIC])
def test_greedy_suffix_drafts_from_earlier_requests(tiny_model_dirs, mode):
    tree = TreeBudget(depth=6, branching=3, draft_nodes=12, mode=mode)
    engine = engine_for(tiny_model_dirs["qwen2"], "suffix", tree)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompt = engine.prepare_text(PROMPTS[1])
    first = engine.generate(prompt, params)
    assert engine.proposer.stats.shared_nodes == 0  # nothing was shared yet
    again = engine.generate(prompt, params)  # the first output is in the shared store now
    assert again.token_ids == first.token_ids == reference_greedy(engine, prompt, 40)
    assert engine.proposer.stats.shared_nodes > 0
    assert again.metrics.mean_accepted_length > first.metrics.mean_accepted_length
    assert_greedy_equal(engine)  # later prompts draft from a store that holds other outputs


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_self_draft_with_every_layer_accepts_everything(tiny_model_dirs, family):
    # the view over all (2) layers is the target itself: every chain draft is the greedy path
    engine = engine_for(tiny_model_dirs[family], "self:2", TreeBudget(depth=4, branching=1, draft_nodes=4))
    out = engine.generate(engine.prepare_text(PROMPTS[0]), SamplingParams(max_tokens=21, ignore_eos=True))
    assert out.metrics.verify_steps == 4 and out.metrics.mean_accepted_length == pytest.approx(5.0)
    assert out.token_ids == reference_greedy(engine, engine.prepare_text(PROMPTS[0]), 21)
    assert len(engine.target.model.model.layers) == 2 and engine.target.config.num_hidden_layers == 2


@pytest.mark.parametrize(("family", "draft", "message"), [
    ("llama", "self:3", "needs 1..2 layers"),
    ("llama", "self:x", "takes a number of layers"),
    ("llava", "self:1", "text-only models"),
])
def test_self_draft_refuses_what_it_cannot_do(tiny_model_dirs, family, draft, message):
    with pytest.raises(ValueError, match=message):
        engine_for(tiny_model_dirs[family], draft)


@pytest.mark.parametrize("mode", list(TreeMode))
def test_greedy_with_draft_model(tiny_model_dirs, mode):
    # same tokenizer, different family and weights: a real but imperfect drafter
    tree = TreeBudget(depth=4, branching=3, draft_nodes=10, mode=mode, preset="small-8")
    engine = engine_for(tiny_model_dirs["llama"], str(tiny_model_dirs["qwen2"]), tree)
    assert_greedy_equal(engine)


@pytest.mark.parametrize("mode", [TreeMode.CHAIN, TreeMode.DYNAMIC])
def test_greedy_with_int8_draft_model(tiny_model_dirs, mode):
    # the int8 draft LM (float32 activations) proposes for a float64 target: output unchanged
    tree = TreeBudget(depth=4, branching=3, draft_nodes=10, mode=mode)
    engine = engine_for(tiny_model_dirs["llama"], str(tiny_model_dirs["qwen2"]), tree, draft_quantization="int8")
    assert isinstance(engine.proposer.model.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    assert_greedy_equal(engine)


def test_greedy_draft_model_identical_to_target_accepts_everything(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    # a random model is nearly uniform, so only a chain is sure to hold the greedy path
    engine = engine_for(path, str(path), TreeBudget(depth=4, branching=1, draft_nodes=4))
    out = engine.generate(engine.prepare_text(PROMPTS[0]), SamplingParams(max_tokens=21, ignore_eos=True))
    # prefill emits 1 token; then every step accepts all 4 drafted tokens + 1 bonus
    assert out.metrics.verify_steps == 4
    assert out.metrics.mean_accepted_length == pytest.approx(5.0)


class SecondChildOracle(SequentialProposer):
    """Knows the greedy answer: proposes a wrong token as the root's first child and the right one as
    its second, so every step accepts the path [0, 2], whose KV row must move next to the prefix."""

    def __init__(self, answer: list[int], vocab: int) -> None:
        self.answer, self.vocab = answer, vocab
        self.emitted, self.trees = 0, 0
        self.device = torch.device("cpu")

    def open(self, context: DraftContext) -> SecondChildOracle:
        self.emitted = 1  # the prefill's token
        return self

    def propose(self, root_token: int) -> DraftProposal:
        if self.emitted >= len(self.answer):
            return DraftProposal(DraftTree.from_parents(torch.tensor([[root_token]]), torch.tensor([[-1]])))
        right = self.answer[self.emitted]
        self.trees += 1
        tokens = torch.tensor([[root_token, (right + 1) % self.vocab, right]])
        return DraftProposal(DraftTree.from_parents(tokens, torch.tensor([[-1, 0, 0]])))

    def commit(self, tokens, hidden) -> None:
        self.emitted += len(tokens)  # root + accepted drafts: as many as the step emitted

    def close(self) -> None:
        pass


def counting_compactions(engine: Engine) -> list:
    calls, compact = [], engine.cache.compact
    engine.cache.compact = lambda nodes: calls.append(nodes.tolist()) or compact(nodes)
    return calls


def test_kv_rows_move_only_for_a_path_off_the_first_chain(tiny_model_dirs):
    """Compaction is skipped when every accepted path already lies after its prefix (nodes 0, 1, ...:
    plain decoding, a chain accepted from its start), and runs, exactly, when one does not."""
    path = tiny_model_dirs["qwen2"]
    plain = engine_for(path)
    prompt = plain.prepare_text(PROMPTS[2])
    params = SamplingParams(max_tokens=30)
    expected = reference_greedy(plain, prompt, 30)
    calls = counting_compactions(plain)
    assert plain.generate(prompt, params).token_ids == expected and calls == []
    oracle = SecondChildOracle(expected, plain.target.config.vocab_size)
    engine = engine_for(path, proposer=oracle)
    calls = counting_compactions(engine)
    out = engine.generate(prompt, params)
    assert out.token_ids == expected
    assert oracle.trees > 5 and calls == [[[0, 2]]] * oracle.trees


def test_greedy_with_wrong_token_drafter(tiny_model_dirs):
    path = tiny_model_dirs["qwen2"]
    vocab = engine_for(path).target.config.vocab_size
    engine = engine_for(path, proposer=WrongTokenProposer(vocab))
    assert_greedy_equal(engine)


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_greedy_llava_with_image(tiny_model_dirs, draft):
    engine = engine_for(tiny_model_dirs["llava"], draft)
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    messages = [{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "describe the red circle"},
    ]}]
    prompt = engine.prepare_chat(messages)
    assert prompt.images is not None and prompt.num_images == 1
    out = engine.generate(prompt, SamplingParams(max_tokens=30))
    assert out.token_ids == reference_greedy(engine, prompt, 30)


def test_greedy_without_drafting_per_request_is_the_same_output(tiny_model_dirs):
    """`SamplingParams(speculative=False)` verifies the root alone every step: no draft proposed or
    accepted, and the same tokens as drafting (and as the target alone); every emitted token carries
    its origin, drafts at depths 1..k of their step and the target's own token (depth 0) last."""
    engine = engine_for(tiny_model_dirs["llama"], "ngram")
    accepted = 0
    for text in PROMPTS:
        prompt = engine.prepare_text(text)
        on = list(engine.stream(prompt, SamplingParams(max_tokens=40, ignore_eos=True)))
        off = list(engine.stream(prompt, SamplingParams(max_tokens=40, ignore_eos=True, speculative=False)))
        tokens = [t for out in on for t in out.token_ids]
        assert tokens == [t for out in off for t in out.token_ids] == reference_greedy(engine, prompt, 40)
        assert all(out.depths == [0] for out in off)
        for out in on[:-1]:  # the last step may be cut at max_tokens
            assert out.depths == list(range(1, len(out.depths))) + [0]
        accepted += sum(d > 0 for out in on for d in out.depths)
        metrics = engine.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True, speculative=False)).metrics
        assert metrics.proposed_draft_tokens == metrics.accepted_draft_tokens == 0 and metrics.verify_steps == 39
    assert accepted > 0  # the drafting runs did accept drafts (the repeating prompts)


@pytest.mark.skipif(not can_pack_half(torch.float16, torch.device("cpu")), reason="no fbgemm half-precision GEMM")
@pytest.mark.parametrize("draft", ["ngram", "self:1"])
def test_greedy_half_packed_target_matches_its_own_decoding(tiny_model_dirs, tmp_path, draft):
    """A float16 model runs its linear layers on fbgemm's half-precision GEMM (`HalfLinear`, as bfloat16
    does on a CPU without native bfloat16); a row gets the same bits alone and in a tree, so drafting
    gives the output of plain decoding of that model, token for token."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    with torch.no_grad():  # weights float16 holds exactly (a random init has some below its normal range)
        for param in model.parameters():
            param.copy_(param.half().float() * (param.abs() > 1e-4))
    model.save_pretrained(tmp_path)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        if (tiny_model_dirs["llama"] / name).exists():
            (tmp_path / name).write_bytes((tiny_model_dirs["llama"] / name).read_bytes())
    engine = Engine.from_config(EngineConfig(model=str(tmp_path), draft=draft, dtype="float16", batch_tree_tokens=0))
    linears = [m for m in engine.target.model.modules() if isinstance(m, (HalfLinear, torch.nn.Linear))]
    assert linears and all(isinstance(m, HalfLinear) for m in linears)  # decoder layers and LM head
    accepted = 0
    for text in PROMPTS:
        prompt = engine.prepare_text(text)
        on = engine.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
        off = engine.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True, speculative=False))
        assert on.token_ids == off.token_ids, text
        accepted += on.metrics.accepted_draft_tokens
    assert accepted > 0
