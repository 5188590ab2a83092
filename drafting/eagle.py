"""EAGLE-2 / MSD drafting with a one-layer head over the target's own features.

A session keeps the head's KV rows (its slot of the proposer's `SlotCache`) in step with the target's.
Drafter entry k pairs a token with the target feature one position before it (see `eagle_inputs`
for the alignment and the image modes):

- open: the prompt's entries (positions 1..L-1) run through the head in one causal forward;
- drafting(root): the entries of the tokens accepted last time plus fc(e(root), h at the last
  committed position) run through the head in one causal forward (the catch-up); the last output is
  the root's predicted feature, whose LM-head logits give the root's children. Each deeper tree level
  runs its frontier in one forward with a tree mask, pairing each node's token with its parent's
  *predicted* feature (the target has not seen drafted nodes). The tree rows lie past the session's
  committed length, so the next catch-up simply overwrites them. With `grow` False nothing runs
  (the turn verifies the root alone): the root joins the waiting entries, and the next drafting
  turn's catch-up takes in all of them in one forward;
- commit(root + accepted, h at them): h[i] pairs with the token after tokens[i], i.e. with the
  next accepted token or, for the last one, the bonus token, which arrives as the next root. The
  root's own entry already used true features, so it stays; the drafted entries it replaces were
  never committed.

Every forward is yielded to `batched.drive`, so the sessions of a batch share each head forward and
each LM-head projection.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.kv_cache import SlotCache, kv_bytes_per_token
from .base import DraftContext, DraftProposal, root_only
from .batched import (
    DraftForward,
    Drafting,
    DraftReply,
    SlotProposer,
    SlotSession,
    pad_forwards,
    replies,
    scored_rows,
)
from .budget import TreeBudget
from .dynamic_tree import Candidates
from .eagle_head import EagleHead
from .eagle_inputs import prompt_entries
from .shaper import level_mask, shape_tree


class VocabProjection:
    """Draft log-probs from the target's LM head, restricted to the head's draft vocabulary if any.

    With a vocabulary of K tokens the K rows are gathered once (K x H, a small slice of the head:
    e.g. 8k of SmolLM2's 49k rows), so a tree level reads K rows instead of the whole LM head.
    Log-probs are normalised over the draft vocabulary; tokens outside it get -inf and are never
    drafted (verification, not the drafter, decides the output, so this cannot change it). `dtype`:
    the features' (a quantized head's rows are read back in it)."""

    def __init__(self, lm_head: nn.Module, softcap: float | None, vocab: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        self.vocab = vocab
        if hasattr(lm_head, "weight"):
            weight = lm_head.weight
            self.weight = weight if vocab is None else weight[vocab.to(weight.device)]
        else:  # a quantized untied head keeps no float weight: read back the rows drafting needs
            self.weight = lm_head.dequantized_weight(vocab).to(dtype)
        self.size = lm_head.out_features
        self.softcap = softcap

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, H] -> float32 log-probs [n, V] over the target's whole vocabulary."""
        logits = (features @ self.weight.T).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.vocab is None:
            return logits.log_softmax(-1)
        full = torch.full((len(features), self.size), float("-inf"), device=features.device)
        return full.index_copy_(1, self.vocab.to(features.device), logits.log_softmax(-1))


class EagleProposer(SlotProposer):
    needs_hidden_states = True

    def __init__(
        self, head: EagleHead, embed_tokens: nn.Module, lm_head: nn.Module, softcap: float | None,
        tree: TreeBudget,
    ) -> None:
        """`embed_tokens` and `lm_head` are the target's own (shared, not copied); `softcap` is the
        target's final logit soft-capping (None for most models)."""
        self.head = head
        self.embed_tokens = embed_tokens
        self.projection = VocabProjection(lm_head, softcap, head.draft_vocab, embed_tokens.weight.dtype)
        self.tree = tree
        self.dtype = head.fc.weight.dtype

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.head.layer_config, self.dtype)

    def reserve(self, num_slots: int, capacity: int) -> None:
        self.cache = SlotCache(1, num_slots, capacity, self.head.fc.weight.device)

    def open(self, context: DraftContext) -> EagleSession:
        if context.hidden is None:
            raise ValueError("EAGLE drafting needs the target's hidden states in the DraftContext")
        self.check_reserved()
        return EagleSession(self, context)

    @torch.inference_mode()
    def run(self, slots: list[int], forwards: list[DraftForward]) -> list[DraftReply]:
        """One head forward for the rows of every session, then one LM-head projection of the rows
        they score."""
        inputs, positions, mask, n = pad_forwards(forwards, self.dtype)
        self.cache.bind(slots, [f.offset for f in forwards], n)
        features = self.head(inputs, positions, mask, self.cache)
        return replies(features, self.projection.log_probs(scored_rows(features, forwards)), forwards)


class EagleSession(SlotSession):
    def __init__(self, proposer: EagleProposer, context: DraftContext) -> None:
        self.proposer = proposer
        self.head = proposer.head
        self.embed_tokens = proposer.embed_tokens
        self.tree = proposer.tree
        self.slot = context.slot
        self.device = context.hidden.device
        ids = torch.tensor(context.token_ids, device=self.device)
        image_mask = context.image_mask if context.image_mask is not None else torch.zeros_like(ids).bool()
        self.pending_tokens: list[int] = []  # committed tokens whose entries wait for the catch-up
        self.pending_hidden = context.hidden[-1:]  # [len(pending_tokens) + 1, H], paired with them + root
        self.length = 0  # committed drafter entries in the slot (the last one is the root's)
        self.features: dict[int, torch.Tensor] = {}  # candidate node -> predicted feature, this proposal
        self.node_slots: dict[int, int] = {}  # candidate node -> its cache row, this proposal
        with torch.inference_mode():
            entries = prompt_entries(
                self.head, self.embed_tokens, ids, context.hidden, context.inputs_embeds, image_mask
            )
        if len(entries.inputs):
            self.prefill(entries.inputs)

    def commit(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        # tokens[0] is the root, whose entry the last proposal cached (or left waiting) with true features
        self.pending_tokens.extend(tokens[1:])
        self.pending_hidden = torch.cat([self.pending_hidden, hidden])

    def close(self) -> None:
        self.features, self.node_slots = {}, {}

    def drafting(self, root_token: int, grow: bool = True) -> Drafting:
        """Catch up, then grow the tree level by level; returns the proposal. Without `grow` the
        catch-up waits too (the root's entry joins the waiting ones): no head forward this turn."""
        if not grow:
            self.pending_tokens.append(root_token)
            return root_only(root_token, self.device)
        root_logps = yield from self._catch_up(root_token)
        self.node_slots = {}
        # drafts are one-hot (no draft distribution): tree acceptance samples losslessly in every mode
        tree = yield from shape_tree(root_token, lambda c, n, level: self._expand(c, n, level, root_logps),
                                     self.tree, self.device)
        return DraftProposal(tree)

    def _catch_up(self, root_token: int) -> Drafting:
        """The waiting entries and the root's through the head; returns the root's children log-probs
        [1, V] (the root's predicted feature is kept as node 0's)."""
        tokens = torch.tensor(self.pending_tokens + [root_token], device=self.device)
        inputs = self.head.fuse(self.embed_tokens(tokens), self.pending_hidden)
        self.pending_tokens, self.pending_hidden = [], self.pending_hidden[:0]
        reply = yield from self.append(inputs, scored=[len(inputs) - 1])
        self.features = {0: reply.outputs[-1]}
        return reply.log_probs

    def _expand(self, cands: Candidates, nodes: list[int], level: int, root_logps: torch.Tensor) -> Drafting:
        """Log-probs [len(nodes), V] of the children of `nodes` (all at depth `level`)."""
        if level == 0:
            return root_logps
        return (yield from self._run_level(cands, nodes, level))

    def _run_level(self, cands: Candidates, nodes: list[int], level: int) -> Drafting:
        """One forward for a tree level: node = fc(e(its token), its parent's predicted feature)."""
        cache_len = self.length + len(self.node_slots)  # committed entries, then this proposal's nodes
        # committed entries (the root's included) and the cache rows of each node's ancestors
        allowed = level_mask(cands, nodes, self.node_slots, self.length, cache_len, self.device)
        tokens = torch.tensor([cands.tokens[node] for node in nodes], device=self.device)
        parents = torch.stack([self.features[cands.parents[node]] for node in nodes])
        inputs = self.head.fuse(self.embed_tokens(tokens), parents)
        # the root's entry sits at length - 1, so a node at depth `level` sits `level` after it
        positions = torch.full((len(nodes),), self.length - 1 + level, device=self.device)
        reply = yield DraftForward(inputs, positions, allowed, cache_len, list(range(len(nodes))))
        for row, node in enumerate(nodes):
            self.node_slots[node] = cache_len + row
            self.features[node] = reply.outputs[row]
        return reply.log_probs
