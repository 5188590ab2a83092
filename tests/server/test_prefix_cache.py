"""Prefix caching: before its first prompt chunk a new text prompt takes the KV rows of the longest
prefix it shares with any slot and prefills only the rest; the output is still what the target alone
produces."""

from __future__ import annotations

import pytest
from PIL import Image

from specserve.drafting.eagle_head import ImageMode
from specserve.server.engine.config import SamplingParams
from tests.server.test_engine_batch import PROMPTS, engine_for, reference_greedy, run_batched

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def first_chunk(engine, seq) -> list[int]:
    """Step `seq` once: its first prompt chunk, before which it looks for a cached prefix. Returns the
    tokens it emitted (none if its prompt needs more chunks)."""
    out = engine.step_batch([seq])[0]
    return [] if out is None else out.token_ids


def started(engine, prompt) -> int:
    """The prompt tokens a sequence of `prompt` finds in the KV cache (its slot is given back)."""
    seq = engine.start(prompt, GREEDY)
    first_chunk(engine, seq)
    engine.release(seq)
    return seq.cached_tokens


@pytest.mark.parametrize("draft", ["none", "ngram", "self:1"])
def test_a_repeated_prompt_and_the_next_turn_reuse_the_slot_and_stay_exact(tiny_model_dirs, draft):
    engine = engine_for(tiny_model_dirs["llama"], draft)
    prompt = engine.prepare_text(PROMPTS[2])
    first = engine.generate(prompt, GREEDY)
    again = engine.start(prompt, GREEDY)
    tokens = first_chunk(engine, again)
    assert again.cached_tokens == len(prompt.token_ids) - 1  # never the last token: it gives the first logits
    assert again.slot == 0
    while not again.finished:
        tokens += engine.step(again).token_ids
    engine.release(again)
    assert tokens == first.token_ids == reference_greedy(engine, prompt, 12)

    # the next turn of the conversation: the earlier prompt and answer, then more
    turn = engine.prepare_text(prompt.token_ids + first.token_ids + engine.prepare_text(" and then").token_ids)
    out = engine.generate(turn, GREEDY)
    # the slot held the prompt and every output token but the last (which never entered the cache)
    assert out.metrics is not None and engine.slot_tokens[0][: len(prompt.token_ids)] == prompt.token_ids
    assert started(engine, turn) == len(turn.token_ids) - 1
    assert out.token_ids == reference_greedy(engine, turn, 12)


def test_the_longest_shared_prefix_is_copied_from_any_slot_into_the_lowest_free_one(tiny_model_dirs):
    engine = engine_for(tiny_model_dirs["llama"], "ngram", max_num_seqs=4)
    short, long, other = (engine.prepare_text(t) for t in ("a red circle", PROMPTS[3], "zzz qqq"))
    run_batched(engine, [(0, p, GREEDY) for p in (short, long, other)])  # slots 0, 1, 2, all free again
    held = [len(engine.slot_tokens[slot]) for slot in range(3)]
    assert held == [len(p.token_ids) + 11 for p in (short, long, other)]
    # `short` is a prefix of `long`: a prompt that continues `long` shares most with slot 1, whose
    # rows are copied into slot 0, the lowest free one; slot 1 keeps them for the next prompt
    probe = engine.prepare_text(long.token_ids + short.token_ids)
    seq = engine.start(probe, GREEDY)
    outs = {0: first_chunk(engine, seq), 1: []}
    assert seq.slot == 0 and seq.cached_tokens >= len(long.token_ids)
    assert 0 not in engine.slot_tokens and len(engine.slot_tokens[1]) == len(long.token_ids) + 11
    # a running sequence's rows are shared too: the same prompt again copies all of it but its last
    # token from slot 0 into slot 1
    twin = engine.start(probe, GREEDY)
    outs[1] = first_chunk(engine, twin)
    assert (twin.slot, twin.cached_tokens) == (1, len(probe.token_ids) - 1)
    while not (seq.finished and twin.finished):
        live = [s for s in (seq, twin) if not s.finished]
        for s, out in zip(live, engine.step_batch(live)):
            if out is not None:
                outs[s.slot] += out.token_ids
    assert outs[0] == outs[1] == reference_greedy(engine, probe, 12)
    engine.release(seq)
    engine.release(twin)
    # nothing shared: the lowest free slot, nothing cached
    unseen = engine.target.config.vocab_size - 1
    seq = engine.start(engine.prepare_text([unseen, unseen]), GREEDY)
    first_chunk(engine, seq)
    assert (seq.slot, seq.cached_tokens) == (0, 0)
    engine.release(seq)


def test_sequences_admitted_together_prefill_their_shared_prefix_once(tiny_model_dirs):
    # a burst of requests with one system prompt: each looks for its prefix just before its first
    # chunk, so it finds what the sequences ahead of it prefilled earlier in the same turn
    engine = engine_for(tiny_model_dirs["llama"], "ngram", max_num_seqs=4)
    system = engine.prepare_text(PROMPTS[3]).token_ids
    prompts = [engine.prepare_text(system + engine.prepare_text(text).token_ids)
               for text in (" the quick brown fox", " zzz qqq", " the quick brown fox")]
    seqs = [engine.start(prompt, GREEDY) for prompt in prompts]
    outs = engine.step_batch(seqs)  # one turn: the three prompts' first (and only) chunks, in order
    assert all(out is not None for out in outs)
    cached = [seq.cached_tokens for seq in seqs]
    assert cached[0] == 0 and len(system) <= cached[1] < len(prompts[1].token_ids) - 1
    assert cached[2] == len(prompts[2].token_ids) - 1  # the same prompt as the first: all but its last token
    tokens = [out.token_ids for out in outs]
    while not all(seq.finished for seq in seqs):
        live = [i for i, seq in enumerate(seqs) if not seq.finished]
        for i, out in zip(live, engine.step_batch([seqs[i] for i in live])):
            tokens[i] += out.token_ids
    for i, prompt in enumerate(prompts):
        assert tokens[i] == reference_greedy(engine, prompt, 12), i
    for seq in seqs:
        engine.release(seq)


def test_a_sequence_that_leaves_before_its_first_chunk_leaves_its_slot_as_it_found_it(tiny_model_dirs):
    engine = engine_for(tiny_model_dirs["llama"], "ngram")
    prompt = engine.prepare_text(PROMPTS[2])
    engine.generate(prompt, GREEDY)
    held = engine.slot_tokens[0]
    seq = engine.start(engine.prepare_text(PROMPTS[0]), GREEDY)
    engine.release(seq)  # cancelled while waiting for its first chunk: slot 0's rows were never written
    assert engine.slot_tokens[0] == held
    assert started(engine, prompt) == len(prompt.token_ids) - 1


def test_a_slot_left_mid_prefill_offers_the_part_of_the_prompt_it_holds(tiny_model_dirs):
    engine = engine_for(tiny_model_dirs["llama"], "ngram", prefill_chunk_tokens=4)
    prompt = engine.prepare_text(PROMPTS[1])
    seq = engine.start(prompt, GREEDY)
    assert engine.step_batch([seq]) == [None]  # one chunk of 4 tokens, then the client leaves
    engine.release(seq)
    again = engine.start(prompt, GREEDY)
    tokens = first_chunk(engine, again)
    assert again.cached_tokens == 4
    while not again.finished:
        tokens += engine.step(again).token_ids
    assert tokens == reference_greedy(engine, prompt, 12)


def test_reused_slots_in_a_batch_with_new_ones_stay_exact(tiny_model_dirs):
    engine = engine_for(tiny_model_dirs["llama"], "ngram", max_num_seqs=4)
    prompts = [engine.prepare_text(text) for text in PROMPTS[:4]]
    run_batched(engine, [(0, p, GREEDY) for p in prompts[:2]])  # leaves two slots holding prompts 0, 1
    tokens, _, seqs = run_batched(engine, [(turn, p, GREEDY) for turn, p in enumerate(prompts)])
    assert [seqs[i].cached_tokens > 0 for i in range(4)] == [True, True, False, False]
    for i, prompt in enumerate(prompts):
        assert tokens[i] == reference_greedy(engine, prompt, 12), i


def test_no_reuse_when_turned_off_for_images_or_for_a_hidden_state_drafter(tiny_model_dirs, random_head_dir):
    off = engine_for(tiny_model_dirs["llama"], "ngram", prefix_caching=False)
    prompt = off.prepare_text(PROMPTS[2])
    off.generate(prompt, GREEDY)
    assert started(off, prompt) == 0 and off.slot_tokens == {}

    llava = tiny_model_dirs["llava"]
    head = engine_for(llava, str(random_head_dir(llava, ImageMode.DECOUPLED)))
    head.generate(head.prepare_text(PROMPTS[2]), GREEDY)
    assert started(head, head.prepare_text(PROMPTS[2])) == 0  # the head needs every prompt hidden state

    vlm = engine_for(llava, "ngram")
    with_image = vlm.prepare_chat([{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (48, 40), (200, 30, 30))},
        {"type": "text", "text": "describe the red circle"}]}])
    vlm.generate(with_image, GREEDY)
    assert started(vlm, with_image) == 0 and vlm.slot_tokens == {}
