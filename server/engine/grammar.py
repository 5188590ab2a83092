"""Structured output (OpenAI's `response_format`) inside the speculative step.

A request with a response format gets a grammar matcher (llguidance) that has consumed every token
the request emitted, so its state is the state at the draft tree's root. Before the verify forward,
`GrammarState.shape` walks the row's draft tree depth first, advancing the matcher along each branch
and rolling it back on the way up:
- every node gets the set of tokens the grammar allows after it; the target's logits at that node are
  masked to it before acceptance (greedy: the constrained argmax; sampling: the constrained
  distribution), so the bonus token obeys the grammar too;
- a draft node whose token the grammar forbids after its parent is pruned with its subtree before
  the forward (it could never be accepted, and would cost verify width);
- below the leaves (first leaf first), the tokens the grammar forces next (the matcher's
  fast-forward tokens: the bytes every continuation must start with, tokenized) are appended as a
  chain of *grammar drafts*, up to `forced_budget` tokens per tree; in a batch of several rows only
  as far as the widest tree the planner kept (`max_nodes`), so grammar drafts never widen the
  batch's padded forward for the other rows. They are still verified: a model may spell forced bytes with
  other tokens, so they are likely, not certain, to be accepted. The output stays exactly the
  constrained target's.

Worked example (schema {"name": string}): after the tokens `{"` the grammar forces the bytes
`name": "`. A row whose drafter proposed nothing (root `{"` alone) verifies root -> `name` -> `":`
-> ` "`; the target's masked argmax at each node equals the next forced token, so one forward emits
three accepted tokens plus its bonus token.

Why llguidance rather than xgrammar: a 3 MB wheel with no dependencies (xgrammar pulls in torch,
transformers, ninja and more), JSON schemas compile lazily (a new schema costs about a millisecond
before its first mask), and its matcher has the three operations a tree walk needs: consume, mask
and rollback, plus fast-forward tokens.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf
import torch
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

from ...drafting.base import DraftProposal
from ...kernels.tree import DraftTree
from .config import ResponseFormat
from .errors import RequestError

MAX_CACHED_GRAMMARS = 256
ANY_JSON_OBJECT = '{"type": "object"}'
# JSON laid out as `{"a": 1, "b": [2, 3]}`, with no other whitespace: flexible whitespace lets a model
# wander in newlines and spaces until max_tokens (seen with a random tiny model), and a fixed layout
# forces more tokens, which the grammar drafts. A schema may override these with llguidance's
# "x-guidance" options (they apply after these defaults).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarCompiler:
    """One per engine: the tokenizer in llguidance's form (built on first use, about a second) and
    the checked grammar of each response format, cached (least recently used out first)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._grammars: OrderedDict[ResponseFormat, str] = OrderedDict()
        self._lock = threading.Lock()  # the HTTP prepare pool compiles on several threads

    def grammar(self, fmt: ResponseFormat) -> str:
        """The grammar of `fmt`, checked against this model's tokenizer; `RequestError` naming
        `response_format` for a schema the grammar engine cannot compile."""
        with self._lock:
            if fmt in self._grammars:
                self._grammars.move_to_end(fmt)
                return self._grammars[fmt]
            tokenizer = self._llg_tokenizer()
        if fmt.kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(fmt.schema)
        else:
            schema = fmt.schema if fmt.kind == "json_schema" else ANY_JSON_OBJECT
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
            except ValueError as exc:
                raise RequestError(f"response_format's schema is not a JSON object: {exc}",
                                   "response_format") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise RequestError(f"this schema cannot be used: {error}", "response_format")
        with self._lock:
            self._grammars[fmt] = grammar
            while len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        return grammar

    def state(self, fmt: ResponseFormat) -> GrammarState:
        """A fresh matcher for one sequence."""
        grammar = self.grammar(fmt)
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"this schema cannot be used: {matcher.get_error()}", "response_format")
        return GrammarState(matcher, self.vocab_size)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self._eos)
        return self._tokenizer


@dataclass(frozen=True)
class ShapedTree:
    """A row's draft tree after the grammar: pruned, with grammar drafts appended (a row without a
    response format: its tree as proposed, and None for the rest)."""

    proposal: DraftProposal
    allowed: torch.Tensor | None  # [N, V] bool: the tokens the grammar allows after each node
    from_grammar: list[bool] | None  # per node: appended by the grammar (the root is not)


class GrammarState:
    """One sequence's matcher. Between steps it has consumed every emitted token, the root included."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def advance(self, tokens: list[int]) -> None:
        """Consume emitted tokens (drawn from masked logits, so the grammar allows them)."""
        if not self.matcher.consume_tokens(tokens):
            raise RuntimeError(f"the grammar refused an emitted token: {self.matcher.get_error()}")

    def root_mask(self) -> torch.Tensor:
        """[V] bool: the tokens allowed after everything emitted so far."""
        bitmask = allocate_token_bitmask(1, self.vocab_size)
        self._fill(bitmask, 0)
        return unpack(bitmask, self.vocab_size)[0]

    def shape(self, proposal: DraftProposal, forced_budget: int, max_nodes: int | None = None) -> ShapedTree:
        """Prune `proposal` to what the grammar allows, then append up to `forced_budget` grammar drafts
        below its leaves (see the module doc), keeping the tree within `max_nodes` nodes if given.
        Parents stay before children; a chain stays a chain."""
        tree = proposal.tree
        tokens, parents = tree.tokens[0].tolist(), tree.parents[0].tolist()
        children: list[list[int]] = [[] for _ in tokens]
        for node, parent in enumerate(parents[1:], start=1):
            children[parent].append(node)
        kept_tokens, kept_parents, source, grammar = [tokens[0]], [-1], [0], [False]
        leaves: list[int] = []  # kept nodes with no kept child, in depth-first order
        masks = allocate_token_bitmask(len(tokens) + forced_budget, self.vocab_size)

        def prune(node: int, index: int) -> None:
            self._fill(masks, index)
            grew = False
            for child in children[node]:
                if not _allowed(masks[index], tokens[child]):
                    continue  # the grammar forbids it: pruned with its subtree
                self._consume(tokens[child])
                kept_tokens.append(tokens[child])
                kept_parents.append(index)
                source.append(child)
                grammar.append(False)
                prune(child, len(kept_tokens) - 1)
                self.matcher.rollback(1)
                grew = True
            if not grew:
                leaves.append(index)

        prune(0, 0)
        room = forced_budget if max_nodes is None else min(forced_budget, max_nodes - len(kept_tokens))
        for leaf in leaves:
            if room <= 0:
                break
            path = self._path(leaf, kept_tokens, kept_parents)
            for token in path:
                self._consume(token)
            forced = self.matcher.compute_ff_tokens()[:room]
            room -= len(forced)
            parent = leaf
            for token in forced:
                self._consume(token)
                kept_tokens.append(token)
                kept_parents.append(parent)
                source.append(-1)
                grammar.append(True)
                parent = len(kept_tokens) - 1
                self._fill(masks, parent)
            self.matcher.rollback(len(path) + len(forced))
        device = tree.tokens.device
        shaped = DraftTree.from_parents(torch.tensor([kept_tokens], device=device),
                                        torch.tensor([kept_parents], device=device))
        draft_probs = None
        if proposal.draft_probs is not None:  # a sampled chain: pruning keeps a prefix of it
            draft_probs = _chain_probs(proposal.draft_probs, source, kept_tokens)
        allowed = unpack(masks[: len(kept_tokens)], self.vocab_size)
        return ShapedTree(DraftProposal(shaped, draft_probs), allowed, grammar)

    @staticmethod
    def _path(node: int, tokens: list[int], parents: list[int]) -> list[int]:
        """The tokens from below the root down to `node` (what the matcher consumes to reach it)."""
        path = []
        while node > 0:
            path.append(tokens[node])
            node = parents[node]
        return path[::-1]

    def _consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused an allowed token: {self.matcher.get_error()}")

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        fill_next_token_bitmask(self.matcher, bitmask, row)
        if self.matcher.is_error():
            raise RuntimeError(f"the grammar failed: {self.matcher.get_error()}")


def _allowed(bitmask_row: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask_row[token >> 5]) >> (token & 31)) & 1)


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's bitmask [N, ceil(V/32)] int32 (bit j of word w: token 32w + j) -> [N, V] bool."""
    bits = torch.arange(32, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> bits) & 1).flatten(1)[:, :vocab_size].bool()


def _chain_probs(draft_probs: torch.Tensor, source: list[int], tokens: list[int]) -> torch.Tensor:
    """Draft distributions of a pruned / extended chain: node i > 0 keeps its drafter's row
    (`source[i] - 1`), a grammar draft gets a one-hot row (it was proposed with certainty, so
    speculative sampling accepts it with the target's probability of it)."""
    rows = []
    for node in range(1, len(tokens)):
        if source[node] > 0:
            rows.append(draft_probs[0, source[node] - 1])
        else:
            rows.append(torch.nn.functional.one_hot(torch.tensor(tokens[node], device=draft_probs.device),
                                                    draft_probs.shape[-1]).to(draft_probs.dtype))
    if not rows:
        return draft_probs[:, :0]
    return torch.stack(rows)[None]
