"""Structured output inside the speculative step (`server/engine/grammar.py`): greedy output equals a
plain constrained loop (one target forward per token, the same grammar masks) for every drafter, with
pruned draft nodes and grammar drafts; outputs parse and match their schema; grammar rows batch with
free ones; sampling follows the constrained distribution."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import jsonschema
import llguidance
import pytest
import torch

from specserve.drafting.base import DraftProposal
from specserve.drafting.budget import TreeBudget, TreeMode
from specserve.kernels.tree import DraftTree
from specserve.server.engine import Engine
from specserve.server.engine.config import ResponseFormat, SamplingParams
from specserve.server.engine.errors import RequestError
from specserve.server.engine.grammar import unpack

from .test_engine_batch import run_batched
from .test_engine_greedy import PROMPTS, WrongTokenProposer, engine_for
from .test_engine_sampling import chi_square_ok

MAX_NEW = 40
ENUM_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["color", "n"],
    "properties": {"color": {"enum": ["red", "blue", "green"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
}
NESTED_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["name", "tags", "ok"],
    "properties": {"name": {"type": "string", "maxLength": 6},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                   "ok": {"type": "boolean"}},
}
FORMATS = {
    "enum": ResponseFormat.json_schema(ENUM_SCHEMA),
    "nested": ResponseFormat.json_schema(NESTED_SCHEMA),
    "json_object": ResponseFormat("json_object"),
}


def constrained_reference(engine: Engine, prompt, fmt: ResponseFormat, max_new: int) -> list[int]:
    """Plain constrained greedy decoding: the whole sequence through the target for every token, its
    last logits masked by a fresh matcher of the same grammar, argmax, consume."""
    compiler = engine.grammars
    matcher = llguidance.LLMatcher(compiler._llg_tokenizer(), compiler.grammar(fmt), log_level=0)
    ids, out = list(prompt.token_ids), []
    for _ in range(max_new):
        with torch.no_grad():
            logits = engine.target.model(torch.tensor([ids])).logits[0, -1]
        bitmask = torch.tensor([list(matcher.compute_bitmask())], dtype=torch.uint8).view(torch.int32)
        token = int(logits.masked_fill(~unpack(bitmask, logits.shape[-1])[0], float("-inf")).argmax())
        out.append(token)
        assert matcher.consume_token(token)
        if token in engine.eos_token_ids:
            break
        ids.append(token)
    return out


@pytest.fixture(scope="module")
def engines(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    plain = engine_for(path)
    return {
        "none": plain,
        "ngram": engine_for(path, "ngram"),
        "wrong-tokens": engine_for(path, proposer=WrongTokenProposer(plain.target.config.vocab_size)),
        # a chain sampled from the target's first layer: its draft distributions go through the grammar
        "self:1-chain": engine_for(path, "self:1", tree=TreeBudget(mode=TreeMode.CHAIN)),
    }


@pytest.mark.parametrize("draft", ["none", "ngram", "wrong-tokens"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_greedy_structured_output_equals_the_plain_constrained_loop(engines, draft, fmt):
    engine = engines[draft]
    for text in PROMPTS:
        prompt = engine.prepare_text(text)
        params = SamplingParams(max_tokens=MAX_NEW, response_format=FORMATS[fmt])
        out = engine.generate(prompt, params)
        assert out.token_ids == constrained_reference(engine, prompt, FORMATS[fmt], MAX_NEW), text
        if out.finish_reason == "stop":
            value = json.loads(out.text)
            if FORMATS[fmt].schema is not None:
                jsonschema.validate(value, json.loads(FORMATS[fmt].schema))
            else:
                assert isinstance(value, dict)


def test_closed_schemas_end_with_valid_json(engines):
    for text in PROMPTS:
        out = engines["ngram"].generate(engines["ngram"].prepare_text(text),
                                        SamplingParams(max_tokens=MAX_NEW, response_format=FORMATS["enum"]))
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), ENUM_SCHEMA)


def test_grammar_drafts_carry_the_forced_tokens_and_can_be_turned_off(engines, tiny_model_dirs):
    prompt = engines["none"].prepare_text(PROMPTS[0])
    params = SamplingParams(max_tokens=MAX_NEW, response_format=FORMATS["enum"])
    drafted = engines["none"].generate(prompt, params)
    off = Engine(replace(engines["none"].config, grammar_draft_tokens=0), engines["none"].target,
                 engines["none"].tokenizer)
    plain = off.generate(prompt, params)
    assert drafted.token_ids == plain.token_ids
    m = drafted.metrics
    # `{"color": "` and `", "n": ` are forced: most of the answer is drafted by the grammar alone
    assert m.accepted_grammar_tokens >= len(drafted.token_ids) // 2
    assert m.accepted_grammar_tokens <= m.grammar_draft_tokens <= m.proposed_draft_tokens
    assert m.verify_steps < plain.metrics.verify_steps
    assert plain.metrics.grammar_draft_tokens == 0 and plain.metrics.verify_steps == len(plain.token_ids) - 1
    no_spec = engines["none"].generate(prompt, replace(params, speculative=False))
    assert no_spec.token_ids == plain.token_ids and no_spec.metrics.grammar_draft_tokens == 0


def test_shape_prunes_forbidden_branches_and_extends_leaves(engines):
    engine = engines["none"]
    state = engine.grammars.state(FORMATS["enum"])
    brace = engine.tokenizer.convert_tokens_to_ids("{")
    state.advance([brace])  # the root: `{` emitted; now `"color": "` is forced
    quote = engine.tokenizer.convert_tokens_to_ids('"')
    letter = engine.tokenizer.convert_tokens_to_ids("x")
    # root -> `"` (allowed) -> `x` (forbidden: the key is "color"), root -> `x` (forbidden)
    tree = DraftTree.from_parents(torch.tensor([[brace, quote, letter, letter]]), torch.tensor([[-1, 0, 1, 0]]))
    shaped = state.shape(DraftProposal(tree), forced_budget=4)
    tokens = shaped.proposal.tree.tokens[0].tolist()
    assert tokens[:2] == [brace, quote] and letter not in tokens
    assert shaped.proposal.tree.parents[0].tolist() == [-1, 0, 1, 2, 3, 4]  # a chain: forced tokens below `"`
    assert shaped.from_grammar == [False, False, True, True, True, True]
    assert engine.tokenizer.decode(tokens).startswith('{"color')
    assert shaped.allowed.shape == (6, engine.target.config.vocab_size)
    assert bool(shaped.allowed[0, quote]) and not bool(shaped.allowed[0, letter])
    assert shaped.allowed.sum(-1).min() >= 1
    # the matcher is back at the root: the same shape again gives the same tree
    assert state.shape(DraftProposal(tree), forced_budget=4).proposal.tree.tokens[0].tolist() == tokens
    assert state.shape(DraftProposal(tree), forced_budget=0).proposal.tree.tokens[0].tolist() == [brace, quote]


def test_a_sampled_chain_keeps_its_draft_rows_and_grammar_drafts_get_one_hot_rows(engines):
    engine = engines["none"]
    vocab = engine.target.config.vocab_size
    state = engine.grammars.state(FORMATS["enum"])
    brace, quote = engine.tokenizer.convert_tokens_to_ids("{"), engine.tokenizer.convert_tokens_to_ids('"')
    state.advance([brace])
    letter = engine.tokenizer.convert_tokens_to_ids("x")
    probs = torch.softmax(torch.randn(1, 2, vocab, dtype=torch.float64), -1)
    chain = DraftTree.from_parents(torch.tensor([[brace, quote, letter]]), torch.tensor([[-1, 0, 1]]))
    shaped = state.shape(DraftProposal(chain, probs), forced_budget=2)
    draft_probs = shaped.proposal.draft_probs
    assert draft_probs.shape == (1, 3, vocab)  # `"` kept, `x` pruned, two grammar drafts
    assert torch.equal(draft_probs[0, 0], probs[0, 0])
    forced = shaped.proposal.tree.tokens[0, 2:].tolist()
    for row, token in zip(draft_probs[0, 1:], forced):
        assert row[token] == 1 and row.sum() == 1


def test_structured_and_free_requests_share_a_batch(engines):
    engine = engines["ngram"]
    prompts = [engine.prepare_text(t) for t in PROMPTS]
    structured = SamplingParams(max_tokens=MAX_NEW, response_format=FORMATS["nested"])
    free = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    arrivals = [(0, prompts[0], structured), (0, prompts[1], free), (2, prompts[2], structured), (3, prompts[3], free)]
    tokens, largest, _ = run_batched(engine, arrivals)
    assert largest >= 3
    for i, (_, prompt, params) in enumerate(arrivals):
        assert tokens[i] == engine.generate(prompt, params).token_ids


def test_bad_formats_and_combinations_are_refused(engines):
    engine = engines["none"]
    with pytest.raises(RequestError) as bad:
        engine.check_response_format(ResponseFormat.json_schema({"type": "strin"}))
    assert bad.value.param == "response_format" and "strin" in bad.value.message
    prompt = engine.prepare_text(PROMPTS[0])
    with pytest.raises(RequestError):
        engine.start(prompt, SamplingParams(response_format=ResponseFormat.json_schema({"type": "strin"})))
    assert len(engine.free_slots) == engine.num_slots  # nothing was taken
    for extra in ({"ignore_eos": True}, {"min_tokens": 2}):
        with pytest.raises(ValueError, match="response_format"):
            SamplingParams(response_format=FORMATS["enum"], **extra)


# Sampling: the distribution over whole answers of a tiny schema, computed exactly from the target
WORDS_SCHEMA = {"enum": ["ab", "ba", "fox"]}


def exact_answers(engine: Engine, prompt, fmt: ResponseFormat) -> dict[tuple[int, ...], float]:
    """P(answer tokens) under constrained sampling at temperature 1: every path the grammar allows,
    with the product of the target's renormalised masked probabilities."""
    compiler = engine.grammars
    answers: dict[tuple[int, ...], float] = {}

    def walk(matcher, path: list[int], p: float) -> None:
        bitmask = torch.tensor([list(matcher.compute_bitmask())], dtype=torch.uint8).view(torch.int32)
        with torch.no_grad():
            logits = engine.target.model(torch.tensor([prompt.token_ids + path])).logits[0, -1]
        probs = torch.softmax(logits.masked_fill(~unpack(bitmask, logits.shape[-1])[0], float("-inf")), -1)
        for token in probs.nonzero().flatten().tolist():
            q = p * float(probs[token])
            if token in engine.eos_token_ids:
                answers[tuple(path + [token])] = q
                continue
            child = matcher.deep_copy()
            assert child.consume_token(token)
            walk(child, path + [token], q)

    walk(llguidance.LLMatcher(compiler._llg_tokenizer(), compiler.grammar(fmt), log_level=0), [], 1.0)
    assert math.isclose(sum(answers.values()), 1.0, rel_tol=1e-6)
    return answers


@pytest.mark.parametrize("draft", ["ngram", "wrong-tokens", "self:1-chain"])
def test_sampled_structured_answers_follow_the_constrained_distribution(engines, draft):
    engine = engines[draft]
    fmt = ResponseFormat.json_schema(WORDS_SCHEMA)
    prompt = engine.prepare_text(PROMPTS[1])
    exact = exact_answers(engine, prompt, fmt)
    answers = sorted(exact, key=exact.get, reverse=True)
    counts = torch.zeros(len(answers) + 1, dtype=torch.float64)
    for seed in range(600):
        out = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=seed, response_format=fmt))
        key = tuple(out.token_ids)
        counts[answers.index(key) if key in exact else -1] += 1
    assert counts[-1] == 0  # every sampled answer is one the grammar allows
    assert len(answers) >= 3 and max(exact.values()) < 0.9  # a distribution worth testing
    probs = torch.tensor([exact[a] for a in answers] + [0.0], dtype=torch.float64)
    ok, p_value = chi_square_ok(counts[:-1], probs[:-1])
    assert ok, p_value


def test_grammar_drafts_fill_but_never_widen_a_batch(engines):
    engine = engines["none"]
    state = engine.grammars.state(FORMATS["enum"])
    brace = engine.tokenizer.convert_tokens_to_ids("{")
    state.advance([brace])
    root = DraftTree.from_parents(torch.tensor([[brace]]), torch.tensor([[-1]]))
    alone = state.shape(DraftProposal(root), forced_budget=16)
    assert alone.proposal.tree.num_nodes > 4  # `"color": "` and more are forced
    capped = state.shape(DraftProposal(root), forced_budget=16, max_nodes=4)
    assert capped.proposal.tree.num_nodes == 4
    assert capped.proposal.tree.tokens[0].tolist() == alone.proposal.tree.tokens[0, :4].tolist()
    assert state.shape(DraftProposal(root), forced_budget=16, max_nodes=1).proposal.tree.num_nodes == 1
