"""Model drafters draft a batch together (`drafting/batched.py`): each session gets the tree it drafts
alone, the batch takes as many drafter forwards as its longest session (not the sum), and a fault in
one session's drafting fails only that session."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from specserve.drafting.batched import DraftForward, pad_forwards
from specserve.drafting.budget import TreeBudget
from specserve.drafting.draft_model import DraftModelProposer
from specserve.drafting.eagle import EagleProposer
from specserve.drafting.eagle_head import ImageMode
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, SamplingParams

PROMPTS = ["the quick brown fox", "Summarise: the cat sat on the mat. The mat was red.", "hi"]
TREE = TreeBudget(depth=4, branching=3, draft_nodes=8)


def drafter_engine(tiny_model_dirs, random_head_dir, drafter: str) -> Engine:
    """float64, trees verified whole: a draft LM (the tiny Qwen2 drafting for the tiny Llama, same
    tokenizer) or a random MSD head on the tiny LLaVA."""
    if drafter == "draft-lm":
        model, draft = tiny_model_dirs["llama"], str(tiny_model_dirs["qwen2"])
    else:
        model = tiny_model_dirs["llava"]
        draft = str(random_head_dir(model, ImageMode.DECOUPLED))
    engine = Engine.from_config(EngineConfig(model=str(model), draft=draft, dtype="float64", tree=TREE,
                                             batch_tree_tokens=0))
    assert isinstance(engine.proposer, DraftModelProposer if drafter == "draft-lm" else EagleProposer)
    return engine


def prompts(engine: Engine) -> list:
    texts = [engine.prepare_text(t) for t in PROMPTS]
    if not engine.is_multimodal:
        return texts
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    return [engine.prepare_chat([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "describe it"}]}]), *texts[1:]]


def started(engine: Engine, max_tokens: int = 40) -> list:
    """Sequences for every prompt, prefilled (drafters open, first tokens emitted)."""
    seqs = [engine.start(p, SamplingParams(max_tokens=max_tokens)) for p in prompts(engine)]
    assert all(out is not None for out in engine.step_batch(seqs))
    return seqs


def counting_runs(proposer) -> list[int]:
    """Record the number of rows of every batched drafter forward."""
    rows, run = [], proposer.run
    proposer.run = lambda slots, forwards: rows.append(len(slots)) or run(slots, forwards)
    return rows


def recording_proposals(engine: Engine) -> list[list]:
    """Record the proposals of every `propose_batch` call the engine makes (one list per call)."""
    calls, propose_batch = [], engine.proposer.propose_batch

    def recording(*args):
        proposals = propose_batch(*args)
        calls.append(proposals)
        return proposals

    engine.proposer.propose_batch = recording
    return calls


@pytest.mark.parametrize("drafter", ["draft-lm", "msd-head"])
def test_a_batch_drafts_each_sessions_own_tree_in_fewer_forwards(tiny_model_dirs, random_head_dir, drafter):
    together, alone = (drafter_engine(tiny_model_dirs, random_head_dir, drafter) for _ in range(2))
    batch, singles = started(together), started(alone)
    batched_proposals, single_proposals = recording_proposals(together), recording_proposals(alone)
    for turn in range(3):  # three steps each, with commits between them (catch-ups of accepted drafts)
        batched_rows, single_rows = counting_runs(together.proposer), counting_runs(alone.proposer)
        assert all(not isinstance(out, Exception) for out in together.step_batch(batch))
        for seq in singles:
            before = len(single_rows)
            assert not isinstance(alone.step_batch([seq])[0], Exception)
            assert len(single_rows) - before >= 2  # a catch-up and at least one tree level
        for mine, own in zip(batched_proposals[-1], single_proposals[-len(singles):]):
            assert mine.tree.tokens.tolist() == own[0].tree.tokens.tolist()
            assert mine.tree.parents.tolist() == own[0].tree.parents.tolist()
        # one forward per round, each carrying every session still drafting: the longest session's count
        assert len(batched_rows) < len(single_rows) and batched_rows[0] == len(batch)
    assert [s.output_ids for s in batch] == [s.output_ids for s in singles]


def test_a_fault_in_one_sessions_drafting_fails_only_that_sequence(tiny_model_dirs, random_head_dir):
    engine = drafter_engine(tiny_model_dirs, random_head_dir, "draft-lm")
    seqs = started(engine, max_tokens=30)
    real = seqs[1].draft.drafting

    def broken(root_token, grow):  # its first forward runs in the batch, then it fails
        yield next(real(root_token, grow))
        raise RuntimeError("drafter fault")

    seqs[1].draft.drafting = broken
    outs = engine.step_batch(seqs)
    assert isinstance(outs[1], RuntimeError)
    engine.release(seqs.pop(1))
    reference = Engine.from_config(EngineConfig(model=str(tiny_model_dirs["llama"]), dtype="float64"))
    while not all(s.finished for s in seqs):
        live = [s for s in seqs if not s.finished]
        assert all(not isinstance(out, Exception) for out in engine.step_batch(live))
    for seq, prompt in zip(seqs, [PROMPTS[0], PROMPTS[2]]):
        alone = reference.generate(reference.prepare_text(prompt), SamplingParams(max_tokens=30))
        assert seq.output_ids == alone.token_ids  # the others kept drafting, exactly


class AlternatingPlanner:
    """Rows draft every `period`-th turn only (as when the goodput planner finds that drafting cannot
    pay in the others)."""

    def __init__(self, period: int) -> None:
        self.period, self.turns = period, 0

    def drafting(self, rates, pinned):
        self.turns += 1
        return [self.turns % self.period == 0 or pin for pin in pinned]

    def observe_drafting(self, rows, seconds):
        pass

    def observe_turn(self, rows, drafted, tokens, seconds):
        pass

    def plan(self, trees, rates, pinned):
        return [tree.num_nodes for tree in trees]


@pytest.mark.parametrize("drafter", ["draft-lm", "msd-head"])
def test_drafters_catch_up_after_turns_without_drafting(tiny_model_dirs, random_head_dir, drafter):
    """A turn without drafting runs no drafter forward: the committed text waits, and the next turn
    that drafts takes in every skipped token (two turns' worth here) before its tree, so it stays exact."""
    engine = drafter_engine(tiny_model_dirs, random_head_dir, drafter)
    engine.planner = AlternatingPlanner(period=3)
    seqs = started(engine, max_tokens=30)
    sizes, forwards, propose_batch = [], [], engine.proposer.propose_batch
    runs = counting_runs(engine.proposer)

    def recording(*args):
        before = len(runs)
        proposals = propose_batch(*args)
        sizes.append([p.tree.num_nodes for p in proposals])
        forwards.append(len(runs) - before)
        return proposals

    engine.proposer.propose_batch = recording
    while not all(s.finished for s in seqs):
        assert all(not isinstance(out, Exception) for out in engine.step_batch([s for s in seqs if not s.finished]))
    drafting_turns = [turn for turn in range(len(sizes)) if (turn + 1) % 3 == 0]
    assert drafting_turns and len(sizes) > drafting_turns[-1] + 1
    for turn, (turn_sizes, turn_forwards) in enumerate(zip(sizes, forwards)):
        if turn in drafting_turns:
            assert any(n > 1 for n in turn_sizes) and turn_forwards > 0
        else:  # the root alone, and not one drafter forward
            assert all(n == 1 for n in turn_sizes) and turn_forwards == 0
    for seq in seqs:  # the drafter holds (or has pending) an entry for every token the target cached
        held = seq.draft.length + len(seq.draft.pending if drafter == "draft-lm" else seq.draft.pending_tokens)
        assert held == seq.prefix_len - (drafter == "msd-head")  # a head has no entry for position 0
    plain = Engine.from_config(EngineConfig(model=engine.config.model, draft="none", dtype="float64"))
    for seq, prompt in zip(seqs, prompts(plain)):
        assert seq.output_ids == plain.generate(prompt, SamplingParams(max_tokens=30)).token_ids


def test_pad_forwards_docstring_example():
    """Session a catches up 2 entries at offset 7, session b runs a level of 3 nodes at offset 4."""
    a = DraftForward(torch.tensor([5, 6]), torch.tensor([7, 8]), torch.ones(2, 9, dtype=torch.bool).tril(7), 7, [1])
    level = torch.zeros(3, 7, dtype=torch.bool)
    level[:, :4] = True
    level[torch.arange(3), 4 + torch.arange(3)] = True
    b = DraftForward(torch.tensor([1, 2, 3]), torch.tensor([4, 4, 4]), level, 4, [0, 1, 2])
    ids, positions, mask, n = pad_forwards([a, b], torch.float64)
    assert n == 3 and ids.tolist() == [[5, 6, 0], [1, 2, 3]] and mask.shape == (2, 1, 3, 10)
    seen = (mask[:, 0] == 0).int()
    assert seen[0, 2].tolist() == [0] * 9 + [1]  # a's padding row sees only itself (column 7 + 2)
    assert seen[0, :2, :9].tolist() == a.allowed.int().tolist() and seen[0, :2, 9].sum() == 0
    assert seen[1, :, :7].tolist() == level.int().tolist() and seen[1, :, 7:].sum() == 0
    assert positions.tolist() == [[7, 8, 8], [4, 4, 4]]
