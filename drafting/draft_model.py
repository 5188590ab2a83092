"""Drafting with a separate small LM that shares the target's tokenizer.

The session keeps the draft model's KV rows (its slot of the proposer's `SlotCache`) in step with the
target's: opening runs the prompt; each proposal first feeds the tokens accepted since its last
forward and the new root (the catch-up), then drafts. A turn without drafting runs nothing: its
tokens wait for the next drafting turn's catch-up. Tree rows lie past the session's committed length, so the next
catch-up simply overwrites them.

Dynamic mode grows an EAGLE-2 tree (`dynamic_tree.build_dynamic_tree`); each level's frontier is run
through the draft model in one forward with a tree mask, so a node attends to the committed text and
to its own ancestors. Chain mode at temperature > 0 samples one path from the draft distribution q and
returns q, for lossless min(1, p/q) acceptance. Every forward is yielded to `batched.drive`, so the
sessions of a batch share each draft forward.
"""

from __future__ import annotations

import torch

from ..kernels.kv_cache import SlotCache, kv_bytes_per_token
from ..kernels.sampling import LogitsParams, process_logits, sample
from ..kernels.tree import DraftTree
from .base import DraftContext, DraftProposal, root_only
from .batched import DraftForward, Drafting, DraftReply, SlotProposer, SlotSession, pad_forwards, replies
from .budget import TreeBudget, TreeMode
from .dynamic_tree import Candidates
from .shaper import level_mask, shape_tree


def check_draft_vocabulary(model: torch.nn.Module, tokenizer_size: int) -> None:
    """Refuse a draft LM that cannot read every token of the target's tokenizer (`tokenizer_size` ids):
    it drafts on the target's token ids, so it must share the target's tokenizer, special tokens
    included (a VLM's image and tile markers). Its vocabulary may still be padded to another size."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < tokenizer_size:
        raise ValueError(f"the draft LM has {rows} token embeddings, the target's tokenizer {tokenizer_size} "
                         "tokens: a draft LM must share the target's tokenizer")


class DraftModelProposer(SlotProposer):
    needs_hidden_states = False

    def __init__(self, model: torch.nn.Module, tree: TreeBudget, vocab_size: int | None = None) -> None:
        """`vocab_size`: the target's logit width where the draft LM's may differ (vocabularies padded
        to different sizes): draft log-probs are cut to it or padded with -inf, so drafts are target
        ids and a sampled chain's q has the target's width."""
        self.model = model
        self.tree = tree
        self.vocab_size = vocab_size
        self.dtype = model.get_input_embeddings().weight.dtype  # the activations' (int8 weights keep it)

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model.config, self.dtype)

    def reserve(self, num_slots: int, capacity: int) -> None:
        self.cache = SlotCache(self.model.config.num_hidden_layers, num_slots, capacity, self.model.device)

    def open(self, context: DraftContext) -> DraftModelSession:
        self.check_reserved()
        return DraftModelSession(self, context)

    @torch.inference_mode()
    def run(self, slots: list[int], forwards: list[DraftForward]) -> list[DraftReply]:
        """One draft-model forward for the rows of every session; logits only at the scored rows."""
        ids, positions, mask, n = pad_forwards(forwards, self.dtype)
        self.cache.bind(slots, [f.offset for f in forwards], n)
        keep = sorted({row for f in forwards for row in f.scored})  # the LM head runs on these columns only
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
            use_cache=True, logits_to_keep=torch.tensor(keep, dtype=torch.long, device=ids.device),
        ).logits
        column = {row: i for i, row in enumerate(keep)}
        scored = [logits[b, column[row]] for b, f in enumerate(forwards) for row in f.scored]
        if not scored:
            return replies(None, logits.new_zeros(0, 0), forwards)
        scored = torch.stack(scored)
        log_probs = (scored if scored.dtype == torch.float64 else scored.float()).log_softmax(-1)
        return replies(None, fit_width(log_probs, self.vocab_size), forwards)


def fit_width(log_probs: torch.Tensor, width: int | None) -> torch.Tensor:
    """[n, V] log-probs cut or padded with -inf to [n, width] (unchanged for None or V == width)."""
    if width is None or log_probs.shape[-1] == width:
        return log_probs
    if log_probs.shape[-1] > width:  # the padded rows are no tokens: renormalise over the real ones
        return log_probs[:, :width].log_softmax(-1)
    return torch.nn.functional.pad(log_probs, (0, width - log_probs.shape[-1]), value=float("-inf"))


class DraftModelSession(SlotSession):
    def __init__(self, proposer: DraftModelProposer, context: DraftContext) -> None:
        self.proposer = proposer
        self.tree = proposer.tree
        self.params: LogitsParams = context.params
        self.generator = context.generator
        self.slot = context.slot
        self.device = proposer.model.device
        self.pending: list[int] = []  # committed tokens not yet in the draft cache
        self.length = 0  # committed tokens in the slot (after a proposal: the root's included)
        self.node_slots: dict[int, int] = {}  # candidate node -> its cache row, this proposal only
        self.prefill(torch.tensor(context.token_ids, device=self.device))

    def commit(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        # tokens[0] is the root, which the last proposal put in the draft cache or in `pending`
        self.pending.extend(tokens[1:])

    def close(self) -> None:
        self.node_slots = {}

    def drafting(self, root_token: int, grow: bool = True) -> Drafting:
        """Catch up, then draft a tree or sample a chain; returns the proposal. Without `grow` the
        catch-up waits too (the root joins the pending tokens): a turn without drafting runs no draft
        forward, and the next drafting turn takes in every skipped token in one forward."""
        tokens, self.pending = self.pending + [root_token], []
        if not grow:
            self.pending = tokens
            return root_only(root_token, self.device)
        ids = torch.tensor(tokens, device=self.device)
        root_logps = (yield from self.append(ids, scored=[len(tokens) - 1])).log_probs
        self.node_slots = {}
        if self.tree.mode is TreeMode.CHAIN and not self.params.greedy:
            return (yield from self._sample_chain(root_token, root_logps))
        tree = yield from shape_tree(root_token, lambda c, n, level: self._expand(c, n, level, root_logps),
                                     self.tree, self.device)
        return DraftProposal(tree)

    def _expand(self, cands: Candidates, nodes: list[int], level: int, root_logps: torch.Tensor) -> Drafting:
        """Children log-probs [len(nodes), V] of the given candidate nodes; runs them through the model."""
        if level == 0:
            return root_logps
        # each node sees the committed prefix (root included) and the cache rows of its ancestors
        cache_len = self.length + len(self.node_slots)
        allowed = level_mask(cands, nodes, self.node_slots, self.length, cache_len, self.device)
        positions = torch.full((len(nodes),), self.length - 1 + level, device=self.device)
        tokens = torch.tensor([cands.tokens[node] for node in nodes], device=self.device)
        reply = yield DraftForward(tokens, positions, allowed, cache_len, list(range(len(nodes))))
        for row, node in enumerate(nodes):
            self.node_slots[node] = cache_len + row
        return reply.log_probs

    def _sample_chain(self, root_token: int, logps: torch.Tensor) -> Drafting:
        """Sample `depth` tokens from the processed draft distribution q, one forward per token."""
        tokens, probs = [root_token], []
        for step in range(self.tree.depth):
            q = process_logits(logps, self.params.temperature, self.params.top_p, self.params.top_k)
            token = sample(q, self.generator)
            tokens.append(int(token))
            probs.append(q)
            if step + 1 < self.tree.depth:
                offset = self.length + step  # the committed text, then the chain's earlier tokens
                allowed = torch.ones(1, offset + 1, dtype=torch.bool, device=self.device)
                position = torch.tensor([offset], device=self.device)
                logps = (yield DraftForward(token.view(1), position, allowed, offset, [0])).log_probs
        parents = list(range(-1, len(tokens) - 1))
        tree = DraftTree.from_parents(
            torch.tensor([tokens], device=self.device), torch.tensor([parents], device=self.device)
        )
        return DraftProposal(tree, torch.stack(probs, dim=1))
