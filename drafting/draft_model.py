"""Drafting with a separate small LM that shares the target's tokenizer.

The session keeps the draft model's own KV cache in step with the target's: after every proposal the
cache holds the committed tokens plus the root; tree rows added while drafting are cropped away, and
accepted tokens are fed in at the next proposal (in the same forward as the new root).

Dynamic mode grows an EAGLE-2 tree (`dynamic_tree.build_dynamic_tree`); each level's frontier is run
through the draft model in one forward with a tree mask, so a node attends to the committed text and
to its own ancestors. Chain mode at temperature > 0 samples one path from the draft distribution q and
returns q, for lossless min(1, p/q) acceptance.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..kernels.sampling import LogitsParams, process_logits, sample
from ..kernels.tree import DraftTree, additive_mask
from .base import DraftContext, DraftProposal
from .budget import TreeBudget, TreeMode
from .dynamic_tree import Candidates
from .shaper import level_mask, shape_tree


class DraftModelProposer:
    needs_hidden_states = False

    def __init__(self, model: torch.nn.Module, tree: TreeBudget) -> None:
        self.model = model
        self.tree = tree

    def open(self, context: DraftContext) -> DraftModelSession:
        return DraftModelSession(self.model, self.tree, context)


class DraftModelSession:
    def __init__(self, model: torch.nn.Module, tree: TreeBudget, context: DraftContext) -> None:
        self.model = model
        self.tree = tree
        self.params: LogitsParams = context.params
        self.generator = context.generator
        self.device = model.device
        self.cache = DynamicCache()  # full-attention layers, which crop exactly
        self.pending: list[int] = list(context.token_ids)  # committed, not yet in the draft cache
        self.node_slots: dict[int, int] = {}  # candidate node -> its cache row, this proposal only

    def commit(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        # tokens[0] is the root, which the last proposal already put in the draft cache
        self.pending.extend(tokens[1:])

    def close(self) -> None:
        self.cache = None

    @torch.inference_mode()
    def propose(self, root_token: int) -> DraftProposal:
        ids = torch.tensor([self.pending + [root_token]], device=self.device)
        self.pending = []
        root_logits = self.model(
            input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1]
        self.prefix_len = self.cache.get_seq_length()  # committed tokens + root
        self.root_logps = root_logits.float().log_softmax(-1)
        self.node_slots = {}
        if self.tree.mode is TreeMode.CHAIN and not self.params.greedy:
            proposal = self._sample_chain(root_token, root_logits)
        else:
            proposal = DraftProposal(shape_tree(root_token, self._expand, self.tree, self.device))
        # drop the tree rows; the committed text and the root stay
        self.cache.crop(self.prefix_len - self.cache.get_seq_length())
        return proposal

    def _expand(self, cands: Candidates, nodes: list[int], level: int) -> torch.Tensor:
        """Children log-probs of the given candidate nodes; runs them through the draft model."""
        if level == 0:
            return self.root_logps
        logits = self._forward_nodes(cands, nodes, level)
        return logits.float().log_softmax(-1)

    def _forward_nodes(self, cands: Candidates, nodes: list[int], level: int) -> torch.Tensor:
        # Each node sees the committed prefix (incl. root) and the cache slots of its ancestors.
        cache_len = self.cache.get_seq_length()
        allowed = level_mask(cands, nodes, self.node_slots, self.prefix_len, cache_len, self.device)
        mask = additive_mask(allowed, self.model.dtype)
        positions = torch.full((1, len(nodes)), self.prefix_len - 1 + level, device=self.device)
        tokens = torch.tensor([[cands.tokens[node] for node in nodes]], device=self.device)
        out = self.model(
            input_ids=tokens, attention_mask=mask, position_ids=positions,
            past_key_values=self.cache, use_cache=True,
        )
        for row, node in enumerate(nodes):
            self.node_slots[node] = cache_len + row
        return out.logits[0]

    def _sample_chain(self, root_token: int, logits: torch.Tensor) -> DraftProposal:
        """Sample `depth` tokens from the processed draft distribution q, one forward per token."""
        tokens, probs = [root_token], []
        for step in range(self.tree.depth):
            q = process_logits(logits, self.params.temperature, self.params.top_p, self.params.top_k)
            token = sample(q, self.generator)
            tokens.append(int(token))
            probs.append(q)
            if step + 1 < self.tree.depth:
                logits = self.model(
                    input_ids=token.view(1, 1), past_key_values=self.cache, use_cache=True
                ).logits[:, -1]
        parents = list(range(-1, len(tokens) - 1))
        tree = DraftTree.from_parents(
            torch.tensor([tokens], device=self.device), torch.tensor([parents], device=self.device)
        )
        return DraftProposal(tree, torch.stack(probs, dim=1))
