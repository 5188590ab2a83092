"""Stop rules and incremental detokenization on a real tokenizer (the tiny test BPE)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from specserve.server.engine.config import SamplingParams
from specserve.server.engine.detokenizer import IncrementalDetokenizer
from specserve.server.engine.outputs import PromptInput
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


def feed(seq: Sequence, tokens: list[int], chunk: int) -> tuple[str, list[int]]:
    text, ids = "", []
    for i in range(0, len(tokens), chunk):
        out = seq.emit(tokens[i : i + chunk], None)
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
    assert seq.emit(tokens[:1], None).text == ""
    assert seq.emit(tokens[1:], None).text == "✓"


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
    out = seq.emit(tokens + [tokenizer.eos_token_id] + tokens, None)
    assert out.finish_reason == "stop" and out.token_ids == tokens + [tokenizer.eos_token_id]
    assert out.text == "the cat sat"
    seq = make_sequence(tokenizer, max_tokens=2)
    out = seq.emit(tokens, None)
    assert out.finish_reason == "length" and out.token_ids == tokens[:2]
    seq = make_sequence(tokenizer, max_tokens=1000, ignore_eos=True)
    assert not seq.emit(tokens + [tokenizer.eos_token_id], None).finished
