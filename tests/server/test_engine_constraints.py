"""A request's logit bias and min_tokens under speculative decoding: every tree node's logits carry
them before acceptance, so greedy output equals the target's own `generate` with the same bias
(`sequence_bias`) and minimum (`min_new_tokens`), whatever the drafter proposes; the sampling path
sees them too."""

from __future__ import annotations

import pytest
import torch

from specserve.server.engine.config import SamplingParams
from specserve.server.engine.errors import RequestError

from .test_engine_greedy import PROMPTS, WrongTokenProposer, engine_for

MAX_NEW = 24


def reference(engine, prompt, bias: dict[int, float], min_new: int = 0) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    out = engine.target.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
        sequence_bias={(token,): value for token, value in bias.items()} or None, min_new_tokens=min_new)
    return out[0, ids.shape[1]:].tolist()


def engines(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    plain = engine_for(path)
    return {"none": plain, "ngram": engine_for(path, "ngram"),
            "wrong-tokens": engine_for(path, proposer=WrongTokenProposer(plain.target.config.vocab_size))}


@pytest.fixture(scope="module")
def by_draft(tiny_model_dirs):
    return engines(tiny_model_dirs)


@pytest.mark.parametrize("draft", ["none", "ngram", "wrong-tokens"])
def test_greedy_logit_bias_matches_generate_with_the_same_bias(by_draft, draft):
    engine = by_draft[draft]
    changed = 0
    for text in PROMPTS:
        prompt = engine.prepare_text(text)
        plain = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)).token_ids
        # ban the two tokens the plain answer uses most, favour another one a little
        banned = sorted(set(plain), key=plain.count)[-2:]
        bias = {banned[0]: -100.0, banned[1]: -100.0, 7: 2.5}
        out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW, logit_bias=tuple(bias.items())))
        assert out.token_ids == reference(engine, prompt, bias), text
        assert not set(banned) & set(out.token_ids)
        changed += out.token_ids != plain[: len(out.token_ids)]
    assert changed == len(PROMPTS)


@pytest.mark.parametrize("draft", ["none", "ngram", "wrong-tokens"])
def test_min_tokens_holds_off_an_end_token_the_bias_forces(by_draft, draft):
    engine = by_draft[draft]
    eos = min(engine.eos_token_ids)
    for text in PROMPTS[:2]:
        prompt = engine.prepare_text(text)
        bias = {eos: 100.0}  # the end token wins every position once it is allowed
        forced = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW, logit_bias=tuple(bias.items())))
        assert forced.token_ids == [eos] and forced.finish_reason == "stop"
        out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW, logit_bias=tuple(bias.items()),
                                                     min_tokens=5))
        assert out.token_ids == reference(engine, prompt, bias, min_new=5)
        assert len(out.token_ids) == 6 and out.token_ids[-1] == eos and eos not in out.token_ids[:5]
        assert out.finish_reason == "stop"


def test_the_sampling_path_sees_the_constraints(by_draft):
    engine = by_draft["ngram"]
    eos, prompt = min(engine.eos_token_ids), engine.prepare_text(PROMPTS[3])
    favoured = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True,
                                                      logit_bias=((11, 100.0),)))
    assert favoured.token_ids == [11] * 12  # +100 leaves no other token any mass
    ended = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=3, min_tokens=4,
                                                   logit_bias=((eos, 100.0),)))
    assert len(ended.token_ids) == 5 and ended.token_ids[-1] == eos and eos not in ended.token_ids[:4]


def test_stop_strings_wait_for_min_tokens(by_draft):
    engine = by_draft["ngram"]
    prompt = engine.prepare_text(PROMPTS[3])
    text = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)).text
    stop = text[:3]  # a stop string the answer reaches within its first tokens
    early = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, stop=(stop,)))
    late = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, stop=(stop,), min_tokens=10))
    assert early.finish_reason == "stop" and len(early.token_ids) < 10
    assert len(late.token_ids) >= 10


def test_bad_constraints_are_refused(by_draft):
    engine = by_draft["none"]
    prompt = engine.prepare_text(PROMPTS[0])
    vocab = engine.target.config.vocab_size
    with pytest.raises(RequestError, match="outside this model's vocabulary") as error:
        engine.start(prompt, SamplingParams(max_tokens=4, logit_bias=((vocab, 1.0),)))
    assert error.value.param == "logit_bias"
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((3, 101.0),))
