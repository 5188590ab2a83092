"""Stop rules and incremental detokenization on a real tokenizer (the tiny test BPE)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from specserve.server.engine.config import SamplingParams
from specserve.server.engine.detokenizer import IncrementalDetokenizer
from specserve.server.engine.outputs import PromptInput, StepOutput
from specserve.server.engine.sequence import Sequence

TEXT = "the cat sat on the mat. The mat was red. ünïcödé ✓ done"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_sequence(tokenizer, **params) -> Sequence:
    prompt = tokenizer.encode("Summarise:", add_special_tokens=False)
    eos = frozenset({tokenizer.eos_token_id})
    return Sequence(PromptInput(prompt), SamplingParams(**params),
                    IncrementalDetokenizer(tokenizer, prompt), eos)


def emit(seq: Sequence, tokens: list[int]) -> StepOutput:
    """`seq.emit` for tokens the target chose itself (depth 0), checking the per-token texts."""
    out = seq.emit(tokens, None, [0] * len(tokens))
    assert "".join(out.token_texts) == out.text and len(out.token_texts) == len(out.token_ids)
    return out


def feed(seq: Sequence, tokens: list[int], chunk: int) -> tuple[str, list[int]]:
    text, ids = "", []
    for i in range(0, len(tokens), chunk):
        out = emit(seq, tokens[i : i + chunk])
        text += out.text
        ids += out.token_ids
        if out.finished:
            break
    return text, ids


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_deltas_concatenate_to_the_full_decode(tokenizer, chunk):
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    seq = make_sequence(tokenizer, max_tokens=1000)
    text, ids = feed(seq, tokens, chunk)
    assert text == tokenizer.decode(tokens) == TEXT
    assert ids == tokens and not seq.finished


def test_partial_utf8_is_held_back(tokenizer):
    tokens = tokenizer.encode("✓", add_special_tokens=False)
    assert len(tokens) > 1  # byte-level: the check mark spans several byte tokens
    seq = make_sequence(tokenizer, max_tokens=100)
    assert emit(seq, tokens[:1]).text == ""
    assert emit(seq, tokens[1:]).text == "✓"


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_stop_string_cuts_inside_a_run(tokenizer, chunk):
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    seq = make_sequence(tokenizer, max_tokens=1000, stop=("mat was",))
    text, ids = feed(seq, tokens, chunk)
    assert text == "the cat sat on the mat. The "
    assert seq.finish_reason == "stop"
    # the returned tokens end with the token that completed the stop string
    assert "mat was" in tokenizer.decode(ids) and "mat was" not in tokenizer.decode(ids[:-1])


def test_possible_stop_prefix_is_held_back_until_resolved(tokenizer):
    seq = make_sequence(tokenizer, max_tokens=1000, stop=("sat on the rug",))
    first, _ = feed(seq, tokenizer.encode("the cat sat on the", add_special_tokens=False), 1)
    assert first.startswith("the cat") and "sat" not in first  # could still become the stop string
    rest, _ = feed(seq, tokenizer.encode(" mat", add_special_tokens=False), 1)
    assert first + rest == "the cat sat on the mat"  # resolved: released


def test_eos_and_length(tokenizer):
    tokens = tokenizer.encode("the cat sat", add_special_tokens=False)
    seq = make_sequence(tokenizer, max_tokens=1000)
    out = emit(seq, tokens + [tokenizer.eos_token_id] + tokens)
    assert out.finish_reason == "stop" and out.token_ids == tokens + [tokenizer.eos_token_id]
    assert out.text == "the cat sat"
    seq = make_sequence(tokenizer, max_tokens=2)
    out = emit(seq, tokens)
    assert out.finish_reason == "length" and out.token_ids == tokens[:2]
    seq = make_sequence(tokenizer, max_tokens=1000, ignore_eos=True)
    assert not emit(seq, tokens + [tokenizer.eos_token_id]).finished


def test_token_texts_split_the_delta_and_depths_follow_the_tokens(tokenizer):
    tokens = tokenizer.encode("✓ the cat sat on the", add_special_tokens=False)
    seq = make_sequence(tokenizer, max_tokens=1000, stop=("on the rug",))
    depths = [1, 2, 3, 0] + [0] * (len(tokens) - 4)
    out = seq.emit(tokens, None, depths)
    assert out.depths == depths and len(out.token_texts) == len(tokens)
    assert "".join(out.token_texts) == out.text == "✓ the cat sat "  # "on the" could still become the stop
    check_bytes = len(tokenizer.encode("✓", add_special_tokens=False))
    assert out.token_texts[: check_bytes - 1] == [""] * (check_bytes - 1)  # a partial character: nothing yet
    assert out.token_texts[check_bytes - 1] == "✓"  # released by the token that completes it
    assert out.token_texts[-1] == ""  # held back
    rest = seq.emit(tokenizer.encode(" mat", add_special_tokens=False), None, [1])
    # the held-back text comes with the token that releases it
    assert rest.token_texts == [rest.text] == ["on the mat"] and rest.depths == [1]


def test_token_texts_and_depths_end_at_a_stop_string(tokenizer):
    tokens = tokenizer.encode("the cat sat on the mat", add_special_tokens=False)
    seq = make_sequence(tokenizer, max_tokens=1000, stop=("sat",))
    out = seq.emit(tokens, None, list(range(1, len(tokens) + 1)))
    assert out.finish_reason == "stop" and "".join(out.token_texts) == out.text == "the cat "
    assert out.depths == list(range(1, len(out.token_ids) + 1)) and len(out.token_ids) < len(tokens)
