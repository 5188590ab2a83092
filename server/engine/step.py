"""The two kinds of engine step, one target forward each: `prefill` and `speculative_step`.

`speculative_step` is the algorithm: propose a draft tree, verify it in one target forward, accept
the longest agreed path plus a bonus token, compact the KV cache, tell the drafter, emit.
"""

from __future__ import annotations

import torch

from ...drafting.base import DraftContext, DraftProposal, Proposer
from ...kernels.acceptance import AcceptResult, chain_sample_accept, greedy_accept, tree_sample_accept
from ...kernels.kv_cache import compact_cache
from ...kernels.sampling import LogitsParams, logprobs_topk, process_logits, sample
from .config import SamplingParams
from .outputs import StepOutput, TokenLogprob
from .profiling import Stopwatch
from .sequence import Sequence
from .target import TargetModel


def prefill(seq: Sequence, target: TargetModel, proposer: Proposer) -> StepOutput:
    """The first step: the prompt through the target, the drafter opened, the first token emitted."""
    seq.cache = target.new_cache()
    out = target.prefill(seq.prompt, seq.cache)
    needs_hidden = proposer.needs_hidden_states
    seq.draft = proposer.open(DraftContext(
        seq.prompt.token_ids, seq.params.logits_params, seq.generator,
        hidden=out.hidden[0] if needs_hidden else None,
        inputs_embeds=out.inputs_embeds[0] if needs_hidden else None,
        image_mask=out.image_mask[0] if needs_hidden else None,
    ))
    if seq.params.greedy:
        token = out.last_logits.argmax(-1)
    else:
        token = sample(_probs(out.last_logits, seq.params.logits_params), seq.generator)
    seq.root_token = int(token)
    seq.prefix_len = seq.prompt_len
    return seq.emit([seq.root_token], _logprobs(out.last_logits, token, seq.params))


def speculative_step(seq: Sequence, target: TargetModel, proposer: Proposer, stopwatch: Stopwatch) -> StepOutput:
    """One target forward that verifies a draft tree and emits the accepted tokens plus a bonus one."""
    # 1. propose: a draft tree rooted at the last emitted token
    with stopwatch.adds_to(seq.metrics, "draft_seconds"):
        proposal = seq.draft.propose(seq.root_token)
    tree = proposal.tree
    # 2. verify: the target scores every tree node in one forward
    with stopwatch.adds_to(seq.metrics, "verify_seconds"):
        out = target.verify(tree, seq.cache, seq.prefix_len)
    # 3. accept: the longest path the target agrees with, plus a bonus token (one host sync)
    result = accept(proposal, out.logits, seq)
    path, emitted = _to_host(result)
    # 4. compact: the accepted path's KV rows move right after the prefix, the rest is dropped
    compact_cache(seq.cache, seq.prefix_len, result.accepted_nodes[:, : len(path)])
    seq.prefix_len += len(path)
    # 5. update the drafter with what entered the cache (root + accepted drafts)
    hidden = out.hidden[0, path] if proposer.needs_hidden_states else None
    with stopwatch.adds_to(seq.metrics, "draft_seconds"):
        seq.draft.commit([seq.root_token] + emitted[:-1], hidden)
    seq.root_token = emitted[-1]
    seq.metrics.observe(tree.num_nodes - 1, len(path) - 1)
    # 6. emit: accepted drafts + bonus; stop conditions may cut the run
    path_logits = out.logits[0, path]
    return seq.emit(emitted, _logprobs(path_logits, torch.tensor(emitted), seq.params))


def accept(proposal: DraftProposal, logits: torch.Tensor, seq: Sequence) -> AcceptResult:
    """Greedy acceptance at temperature 0; otherwise lossless rejection sampling."""
    if seq.params.greedy:
        return greedy_accept(proposal.tree, logits)
    probs = _probs(logits, seq.params.logits_params)  # the same processing for every token, bonus included
    if proposal.draft_probs is not None:
        draft_tokens = proposal.tree.tokens[:, 1:]
        return chain_sample_accept(draft_tokens, proposal.draft_probs, probs, seq.generator)
    return tree_sample_accept(proposal.tree, probs, seq.generator)


def _probs(logits: torch.Tensor, params: LogitsParams) -> torch.Tensor:
    return process_logits(logits, params.temperature, params.top_p, params.top_k)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> list | None:
    """OpenAI logprobs of `tokens` [n] from the logits that produced them [n, V]."""
    if params.logprobs is None:
        return None
    lp = logprobs_topk(logits, tokens.to(logits.device), max(params.logprobs, 1))
    chosen, values, ids = lp.chosen.tolist(), lp.top_values.tolist(), lp.top_ids.tolist()
    k = params.logprobs
    return [
        TokenLogprob(int(t), chosen[i], list(zip(ids[i][:k], values[i][:k])))
        for i, t in enumerate(tokens.tolist())
    ]


def _to_host(result: AcceptResult) -> tuple[list[int], list[int]]:
    """Accepted node indices (root first) and emitted tokens (drafts + bonus), in one host sync."""
    n = result.accepted_nodes.shape[1]
    row = torch.cat([result.accepted_nodes[0], result.emitted_tokens[0]]).tolist()
    path = [node for node in row[:n] if node >= 0]
    return path, row[n : n + len(path)]
