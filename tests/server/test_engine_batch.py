"""Batched steps are exact: every sequence of a batch gets what the target alone produces, whatever
else is in the batch (other lengths, drafters' trees of other sizes, sequences joining and leaving,
greedy next to sampling, images next to text), and one sequence's fault fails only that sequence."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from specserve.drafting.budget import TreeBudget
from specserve.drafting.eagle_head import ImageMode
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams
from specserve.server.engine.outputs import image_tensors
from specserve.server.engine.planner import GoodputPlanner, StepCosts

PROMPTS = [
    "the quick brown fox",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Summarise: the cat sat on the mat. The mat was red.",
    "a red circle, a blue square and a green triangle. a red circle, a blue",
    "hi",
]


def engine_for(path, draft: str = "ngram", **config) -> Engine:
    return Engine.from_config(EngineConfig(model=str(path), draft=draft, dtype="float64",
                                           tree=TreeBudget(depth=4, branching=3, draft_nodes=8), **config))


def reference_greedy(engine: Engine, prompt, max_new: int) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    kwargs = image_tensors(prompt.images, "cpu", torch.float64)
    out = engine.target.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def run_batched(engine: Engine, arrivals: list[tuple[int, object, SamplingParams]], abort: dict[int, int] = {}):
    """Step every live sequence together each turn; request i joins at turn arrivals[i][0] and is
    released at turn abort[i] if given. Returns each request's tokens, the largest batch seen and
    each request's sequence."""
    live, tokens, largest, seqs = {}, {i: [] for i in range(len(arrivals))}, 0, {}
    for turn in range(500):
        for i, (join, prompt, params) in enumerate(arrivals):
            if join == turn:
                live[i] = seqs[i] = engine.start(prompt, params)
        for i in [i for i in live if abort.get(i) == turn]:
            engine.release(live.pop(i))
        if not live and turn > max(a[0] for a in arrivals):
            return tokens, largest, seqs
        order = list(live)
        largest = max(largest, len(order))
        for i, out in zip(order, engine.step_batch([live[i] for i in order])):
            assert not isinstance(out, Exception), out
            tokens[i] += out.token_ids
            if out.finished:
                engine.release(live.pop(i))
    raise AssertionError("the batch did not finish")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("draft", ["none", "ngram", "draft-lm"])
def test_greedy_batch_with_joins_and_leaves_equals_generate(tiny_model_dirs, family, draft):
    if draft == "draft-lm":  # the other family drafts (same tokenizer), batched level by level
        draft = str(tiny_model_dirs["qwen2" if family == "llama" else "llama"])
    engine = engine_for(tiny_model_dirs[family], draft)
    params = [SamplingParams(max_tokens=n) for n in (30, 24, 36, 12, 40)]
    arrivals = [(join, engine.prepare_text(text), p) for join, text, p in zip((0, 0, 2, 5, 5), PROMPTS, params)]
    tokens, largest, _ = run_batched(engine, arrivals, abort={4: 8})
    assert largest >= 4  # the batch really carried several sequences at once
    for i, (_, prompt, p) in enumerate(arrivals[:4]):
        assert tokens[i] == reference_greedy(engine, prompt, p.max_tokens), PROMPTS[i]
    assert 0 < len(tokens[4]) < 40  # the aborted one stopped early; the others were not disturbed
    assert engine.free_slots == list(range(engine.num_slots))  # every slot came back


@pytest.mark.parametrize("draft", ["ngram", "msd-head"])
def test_image_and_text_requests_in_one_batch(tiny_model_dirs, random_head_dir, draft):
    model = tiny_model_dirs["llava"]
    engine = engine_for(model, str(random_head_dir(model, ImageMode.DECOUPLED)) if draft == "msd-head" else draft)
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    with_image = engine.prepare_chat([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "describe the red circle"}]}])
    text_only = engine.prepare_chat([{"role": "user", "content": "a red circle, a blue square"}])
    arrivals = [(0, with_image, SamplingParams(max_tokens=25)), (1, text_only, SamplingParams(max_tokens=30))]
    tokens, largest, _ = run_batched(engine, arrivals)
    assert largest == 2
    assert tokens[0] == reference_greedy(engine, with_image, 25)
    assert tokens[1] == reference_greedy(engine, text_only, 30)


def test_a_seeded_sampled_request_is_the_same_alone_and_in_a_batch(tiny_model_dirs):
    engine = engine_for(tiny_model_dirs["llama"])
    sampled = SamplingParams(max_tokens=30, temperature=1.5, seed=7, ignore_eos=True)
    prompt = engine.prepare_text(PROMPTS[2])
    alone = engine.generate(prompt, sampled).token_ids
    greedy = [(0, engine.prepare_text(t), SamplingParams(max_tokens=30)) for t in PROMPTS[:2]]
    tokens, _, _ = run_batched(engine, [*greedy, (1, prompt, sampled)])
    assert tokens[2] == alone
    for i, (_, p, params) in enumerate(greedy):
        assert tokens[i] == reference_greedy(engine, p, params.max_tokens)


def test_a_failing_drafter_fails_only_its_own_sequence(tiny_model_dirs):
    engine = engine_for(tiny_model_dirs["llama"])
    seqs = [engine.start(engine.prepare_text(t), SamplingParams(max_tokens=20)) for t in PROMPTS[:3]]
    engine.step_batch(seqs)  # prefill: the drafters are open now

    def broken(root_token):
        raise RuntimeError("drafter fault")

    seqs[1].draft.propose = broken
    outs = engine.step_batch(seqs)
    assert isinstance(outs[1], RuntimeError)
    assert all(not isinstance(outs[i], Exception) and outs[i].token_ids for i in (0, 2))


def test_the_kv_budget_bounds_the_slots_and_refuses_what_cannot_fit(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    full = engine_for(path, max_num_seqs=3)
    assert full.num_slots == 3 and full.kv_cache_usage == 0.0
    per_sequence = full.cache.capacity * full.target.kv_bytes_per_token()
    two = engine_for(path, max_num_seqs=8, kv_cache_memory_gib=2.5 * per_sequence / 1024**3)
    assert two.num_slots == 2
    a, b = (two.start(two.prepare_text(t), SamplingParams(max_tokens=5)) for t in PROMPTS[:2])
    with pytest.raises(RuntimeError, match="KV slots"):
        two.start(two.prepare_text(PROMPTS[2]), SamplingParams(max_tokens=5))
    two.step_batch([a, b])
    assert two.kv_cache_usage > 0
    # a row attends over the widest row's width: rows never written must be finite (zeros), not garbage
    assert all(torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all() for layer in two.cache.layers)
    two.release(a)
    two.start(two.prepare_text(PROMPTS[2]), SamplingParams(max_tokens=5))  # the freed slot is reused
    from specserve.server.engine import ModelLoadError
    with pytest.raises(ModelLoadError, match="cannot hold one sequence"):
        engine_for(path, kv_cache_memory_gib=0.5 * per_sequence / 1024**3)


def test_a_fixed_batch_tree_budget_is_shared_by_the_rows(tiny_model_dirs):
    """--batch-tree-tokens 9: 4 rows get 2 tokens each (1 draft); output stays exact."""
    engine = engine_for(tiny_model_dirs["llama"], max_num_seqs=4, batch_tree_tokens=9)
    prompts = [engine.prepare_text(PROMPTS[3] + " " + PROMPTS[3][: 10 + i]) for i in range(4)]
    seqs = [engine.start(p, SamplingParams(max_tokens=20)) for p in prompts]
    engine.step_batch(seqs)  # prefill
    before = [s.metrics.proposed_draft_tokens for s in seqs]
    engine.step_batch(seqs)
    drafted = [s.metrics.proposed_draft_tokens - b for s, b in zip(seqs, before)]
    assert max(drafted) == 1 and min(drafted) >= 0  # n-gram may find no match for a row: root only
    uncapped = engine_for(tiny_model_dirs["llama"], batch_tree_tokens=0)
    tokens, _, _ = run_batched(uncapped, [(0, p, SamplingParams(max_tokens=20)) for p in prompts])
    for i, p in enumerate(prompts):
        assert tokens[i] == reference_greedy(engine, p, 20)


@pytest.mark.parametrize("cost", ["flat", "steep"])
def test_the_planner_sizes_the_batch_to_the_measured_cost_and_output_stays_exact(tiny_model_dirs, cost):
    """By default the engine measures its verify cost at load and plans each step on it. With free
    tokens every row keeps its whole tree; when each token costs as much as the first, drafting stops."""
    engine = engine_for(tiny_model_dirs["llama"], max_num_seqs=4)
    assert isinstance(engine.planner, GoodputPlanner) and len(engine.planner.costs.tokens) >= 2
    engine.planner = GoodputPlanner(StepCosts((1, 64), (1.0, 1.0) if cost == "flat" else (1.0, 64.0)))
    engine.planner.observe_turn = lambda *turn: None  # the costs are made up: measured turns must not overrule them
    prompts = [engine.prepare_text(PROMPTS[3] + " " + PROMPTS[3][: 10 + i]) for i in range(4)]
    tokens, largest, seqs = run_batched(engine, [(0, p, SamplingParams(max_tokens=20)) for p in prompts])
    assert largest == 4
    drafted = sum(seq.metrics.proposed_draft_tokens for seq in seqs.values())
    assert drafted > 20 if cost == "flat" else drafted == 0, drafted
    for i, p in enumerate(prompts):
        assert tokens[i] == reference_greedy(engine, p, 20)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding(tiny_model_dirs):
    """--prefill-chunk 6: a 40-token prompt takes 7 turns to prefill, and in each of them the running
    sequence still gets its tokens; both outputs are exact."""
    engine = engine_for(tiny_model_dirs["llama"], prefill_chunk_tokens=6)
    running = engine.start(engine.prepare_text(PROMPTS[0]), SamplingParams(max_tokens=30))
    while running.prefix_len < running.prompt_len:  # the short prompt's own chunks
        engine.step_batch([running])
    long_prompt = engine.prepare_text((PROMPTS[3] + " ") * 3)
    assert len(long_prompt.token_ids) > 36
    newcomer = engine.start(long_prompt, SamplingParams(max_tokens=10))
    quiet_turns = 0
    while True:
        out_running, out_new = engine.step_batch([running, newcomer])
        assert out_running.token_ids  # never stalled by the newcomer's prefill
        if out_new is not None:
            break
        quiet_turns += 1
        assert newcomer.prefix_len == 6 * quiet_turns  # one chunk per turn
    assert quiet_turns == -(-len(long_prompt.token_ids) // 6) - 1
    while not (running.finished and newcomer.finished):
        engine.step_batch([s for s in (running, newcomer) if not s.finished])
    assert running.output_ids == reference_greedy(engine, engine.prepare_text(PROMPTS[0]), 30)
    assert newcomer.output_ids == reference_greedy(engine, long_prompt, 10)


def test_a_proposal_cut_to_its_first_nodes_is_still_a_tree():
    from specserve.drafting.base import DraftProposal
    from specserve.kernels.tree import DraftTree

    tree = DraftTree.from_parents(torch.tensor([[7, 3, 9, 4, 5]]), torch.tensor([[-1, 0, 0, 1, 1]]))
    probs = torch.rand(1, 4, 10)
    cut = DraftProposal(tree, probs).first(3)
    assert cut.tree.tokens.tolist() == [[7, 3, 9]] and cut.tree.parents.tolist() == [[-1, 0, 0]]
    assert cut.draft_probs.shape == (1, 2, 10)
    assert DraftProposal(tree).first(9).tree is tree


def test_a_request_without_drafting_shares_the_batch_and_the_output(tiny_model_dirs):
    engine = engine_for(tiny_model_dirs["llama"], batch_tree_tokens=0)
    prompt = engine.prepare_text(PROMPTS[3])
    on, off = SamplingParams(max_tokens=30, ignore_eos=True), SamplingParams(max_tokens=30, ignore_eos=True,
                                                                            speculative=False)
    tokens, largest, seqs = run_batched(engine, [(0, prompt, on), (0, prompt, off)])
    assert largest == 2 and tokens[0] == tokens[1] == reference_greedy(engine, prompt, 30)
    assert seqs[0].metrics.accepted_draft_tokens > 0
    assert seqs[1].metrics.proposed_draft_tokens == 0 and seqs[1].metrics.verify_steps == 29
    assert seqs[1].metrics.drafted_steps == 0  # no step of it is a draft, as vLLM counts them
    assert 0 < seqs[0].metrics.drafted_steps <= seqs[0].metrics.verify_steps
