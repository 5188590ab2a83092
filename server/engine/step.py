"""The two kinds of engine step, one target forward each: `prefill` (one chunk of one sequence's
prompt) and `speculative_step` (a batch of sequences).

`speculative_step` is the algorithm: every sequence proposes a draft tree (if the batch planner
expects drafting to pay this turn), the planner cuts each tree to what pays at this batch size, one
target forward verifies all the trees, each row accepts its longest agreed path plus a bonus token,
the KV cache is compacted row by row, the drafters are told, and each sequence emits its tokens.
"""

from __future__ import annotations

import time

import torch

from ...drafting.base import DraftContext, DraftProposal, Proposer
from ...kernels.acceptance import AcceptResult, chain_sample_accept, greedy_accept, tree_sample_accept
from ...kernels.kv_cache import SlotCache
from ...kernels.sampling import LogitsParams, constrain_logits, logprobs_topk, process_logits, sample
from ...kernels.tree import DraftTree, stack_trees
from .config import SamplingParams
from .grammar import ShapedTree
from .outputs import StepOutput, TokenLogprob
from .planner import BatchPlanner
from .profiling import Stopwatch
from .sequence import PendingPrefill, Sequence
from .target import TargetModel


def prefill(seq: Sequence, target: TargetModel, proposer: Proposer, cache: SlotCache,
            max_tokens: int) -> StepOutput | None:
    """The next chunk of the prompt (at most `max_tokens` tokens) through the target; the vision tower
    runs once, before the first chunk. A chunk never cuts a bidirectional block (Gemma 3's images): it
    stops before one, or takes a whole block that starts it even past `max_tokens`. After the last
    chunk the drafter is opened and the first token emitted; before it there is nothing to emit (None)."""
    if seq.prefill is None:
        seq.prefill = PendingPrefill(target.embed(seq.prompt))
    pending, start = seq.prefill, seq.prefix_len
    end = pending.prompt.chunk_end(start, min(seq.prompt_len, start + max_tokens))
    hidden = target.prefill(pending.prompt.embeds[:, start:end], cache, seq.slot, start,
                            pending.prompt.chunk_inputs(start, end))
    seq.prefix_len = end
    needs_hidden = proposer.needs_hidden_states
    if needs_hidden:
        pending.hidden.append(hidden)
    if end < seq.prompt_len:
        return None
    seq.prefill = None
    seq.rope_delta = pending.prompt.rope_delta
    seq.draft = proposer.open(DraftContext(
        seq.prompt.token_ids, seq.params.logits_params, seq.generator,
        hidden=torch.cat(pending.hidden, dim=1)[0] if needs_hidden else None,
        inputs_embeds=pending.prompt.embeds[0] if needs_hidden else None,
        image_mask=pending.prompt.image_mask[0] if needs_hidden else None,
        slot=seq.slot,
    ))
    root_depth = torch.zeros(1, 1, dtype=torch.long)  # the first token follows the prompt: depth 0
    allowed = [seq.grammar.root_mask()[None]] if seq.grammar is not None else None
    last_logits = constrain([seq], target.logits(hidden[:, -1])[:, None], root_depth, allowed)[:, 0]
    if seq.params.greedy:
        token = last_logits.argmax(-1)
    else:
        token = sample(_probs(last_logits, seq.params.logits_params), seq.generator)
    seq.root_token = int(token)
    if seq.grammar is not None:
        seq.grammar.advance([seq.root_token])
    return seq.emit([seq.root_token], _logprobs(last_logits, token, seq.params), [0])  # the target's own token


def speculative_step(
    seqs: list[Sequence], target: TargetModel, proposer: Proposer, cache: SlotCache, stopwatch: Stopwatch,
    planner: BatchPlanner, grammar_draft_tokens: int = 0,
) -> list[StepOutput | Exception]:
    """One target forward that verifies every sequence's draft tree; each emits its accepted tokens
    plus a bonus one. The `planner` cuts each row's tree to what pays in this batch (down to the root
    alone, plain decoding). A row with a response format has its tree pruned to what its grammar
    allows, up to `grammar_draft_tokens` forced tokens appended (in a batch, no wider than the widest
    cut tree), and its logits masked (`grammar.py`).
    A failure that belongs to one sequence (its drafter, its grammar, its detokenizer) is returned in
    that sequence's place and the others go on; a failing forward fails them all."""
    # 1. propose: each drafter proposes a tree rooted at its sequence's last emitted token (model
    # drafters run the whole batch's tree levels together), unless the planner finds that drafting
    # cannot pay this turn (then only pinned rows draft, the others send their root alone); a
    # request that asked for no drafting always sends its root alone
    pinned = [s.params.seed is not None and not s.params.greedy for s in seqs]
    pays = planner.drafting([s.acceptance.value for s in seqs], pinned)
    grow = [g and s.params.speculative for g, s in zip(pays, seqs)]
    start = time.perf_counter()
    with stopwatch.adds_to([seq.metrics for seq in seqs], "draft_seconds"):
        drafted = proposer.propose_batch([seq.draft for seq in seqs], [seq.root_token for seq in seqs], grow)
    if any(grow):
        planner.observe_drafting(sum(grow), time.perf_counter() - start)
    results: dict[int, StepOutput | Exception] = {
        row: out for row, out in enumerate(drafted) if isinstance(out, Exception)}
    proposals = {row: out for row, out in enumerate(drafted) if not isinstance(out, Exception)}
    rows = sorted(proposals, key=lambda row: seqs[row].slot)  # slots in order: the cache reads a range as a view
    if rows:
        batch = [seqs[row] for row in rows]
        # 2. plan: how much of each tree this batch's forward should carry
        sizes = planner.plan([proposals[row].tree for row in rows], [s.acceptance.value for s in batch],
                             [pinned[row] for row in rows])
        # 3. grammar: prune what a row's response format forbids, append what it forces (in a batch,
        # only up to the widest cut tree: the forward is padded to it anyway)
        cut = {row: proposals[row].first(size) for row, size in zip(rows, sizes)}
        width = max(p.tree.num_nodes for p in cut.values()) if len(rows) > 1 else None
        shaped = {row: per_sequence(lambda: _grammar(seqs[row], cut[row], grammar_draft_tokens, width))
                  for row in rows}
        results.update((row, out) for row, out in shaped.items() if isinstance(out, Exception))
        rows = [row for row in rows if not isinstance(shaped[row], Exception)]
        if rows:
            outs = _verify_and_emit([seqs[row] for row in rows], [shaped[row] for row in rows], target, proposer,
                                    cache, stopwatch)
            results.update(zip(rows, outs))
            # what the turn yielded, with the planner's choice (pinned rows draft either way)
            emitted = sum(len(out.token_ids) for out in outs if not isinstance(out, Exception))
            if emitted:
                planner.observe_turn(len(seqs), all(pays), emitted, time.perf_counter() - start)
    return [results[row] for row in range(len(seqs))]


def _grammar(seq: Sequence, proposal: DraftProposal, forced_budget: int, max_nodes: int | None) -> ShapedTree:
    """The row's tree as its grammar leaves it; unchanged (and no mask) without a response format. A
    request that asked for no drafting gets no grammar drafts either."""
    if seq.grammar is None:
        return ShapedTree(proposal, None, None)
    return seq.grammar.shape(proposal, forced_budget if seq.params.speculative else 0, max_nodes)


def _verify_and_emit(
    seqs: list[Sequence], shaped: list[ShapedTree], target: TargetModel, proposer: Proposer,
    cache: SlotCache, stopwatch: Stopwatch,
) -> list[StepOutput | Exception]:
    proposals = [s.proposal for s in shaped]
    tree = stack_trees([p.tree for p in proposals])  # padded to the largest tree
    # 4. verify: the target scores every node of every tree in one forward
    with stopwatch.adds_to([seq.metrics for seq in seqs], "verify_seconds"):
        out = target.verify(tree, cache, [s.slot for s in seqs], [s.prefix_len for s in seqs],
                            [s.rope_delta for s in seqs])
    # 5. accept: per row, the longest path the target agrees with plus a bonus token, on the logits
    # that the row's logit bias, min_tokens and grammar leave
    logits = constrain(seqs, out.logits, tree.depths, [s.allowed for s in shaped])
    results = accept(seqs, proposals, tree, logits)
    # 6. one host sync for the whole batch
    paths, emitted = _to_host(results)
    # 7. compact: each row's accepted KV rows move right after its prefix, the rest is dropped. A path
    # of nodes 0, 1, 2, ... already lies there (plain decoding, a chain accepted from its start): when
    # every row's does, nothing moves
    if any(path != list(range(len(path))) for path in paths):
        width = max(r.accepted_nodes.shape[1] for r in results)
        cache.compact(torch.stack([_pad(r.accepted_nodes[0], width) for r in results]))
    outputs: list[StepOutput | Exception] = []
    for row, seq in enumerate(seqs):
        seq.prefix_len += len(paths[row])
        hidden = out.hidden[row, paths[row]] if proposer.needs_hidden_states else None
        outputs.append(per_sequence(lambda: _advance(seq, shaped[row], paths[row], emitted[row], hidden,
                                                      logits[row, paths[row]], stopwatch)))
    return outputs


def _advance(
    seq: Sequence, shaped: ShapedTree, path: list[int], tokens: list[int], hidden: torch.Tensor | None,
    path_logits: torch.Tensor, stopwatch: Stopwatch,
) -> StepOutput:
    # 8. update the drafter with what entered the cache (root + accepted drafts)
    with stopwatch.adds_to(seq.metrics, "draft_seconds"):
        seq.draft.commit([seq.root_token] + tokens[:-1], hidden)
    seq.root_token = tokens[-1]
    tree = shaped.proposal.tree
    seq.metrics.observe(tree.num_nodes - 1, len(path) - 1)
    seq.acceptance.observe(tree.max_depth, len(path) - 1)
    if shaped.from_grammar is not None:
        seq.metrics.grammar_draft_tokens += sum(shaped.from_grammar)
        seq.metrics.accepted_grammar_tokens += sum(shaped.from_grammar[node] for node in path[1:])
    # 9. emit: accepted drafts + bonus; stop conditions may cut the run. The accepted path runs from
    # the root down, so its i-th draft token sits at tree depth i; the bonus is the target's own (0).
    depths = list(range(1, len(path))) + [0]
    out = seq.emit(tokens, _logprobs(path_logits, torch.tensor(tokens), seq.params), depths)
    if seq.grammar is not None and not seq.finished:
        seq.grammar.advance(out.token_ids)  # the matcher follows the text to the new root
    return out


def constrain(seqs: list[Sequence], logits: torch.Tensor, depths: torch.Tensor,
              allowed: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """`kernels.sampling.constrain_logits` with each row's logit bias, min_tokens and grammar mask
    (logits [B, N, V], the nodes' depths [B, N], `allowed[b]` [N_b, V] bool or None); the logits
    themselves when no row has any."""
    emitted = [len(seq.output_ids) for seq in seqs]
    masked = allowed is not None and any(a is not None for a in allowed)
    if not masked and not any(seq.params.logit_bias or seq.params.min_tokens > n for seq, n in zip(seqs, emitted)):
        return logits
    grammar = None
    if masked:
        grammar = torch.ones(logits.shape, dtype=torch.bool)  # padding nodes and unconstrained rows: all allowed
        for row, mask in enumerate(allowed):
            if mask is not None:
                grammar[row, : len(mask)] = mask
        grammar = grammar.to(logits.device)
    bias = None
    if any(seq.params.logit_bias for seq in seqs):
        bias = torch.zeros(len(seqs), logits.shape[-1], dtype=logits.dtype)
        for row, seq in enumerate(seqs):
            for token, value in seq.params.logit_bias:
                bias[row, token] = value
        bias = bias.to(logits.device)
    banned = torch.tensor([max(seq.params.min_tokens - n, 0) for seq, n in zip(seqs, emitted)], device=logits.device)
    ends = torch.tensor(sorted(seqs[0].eos_token_ids), dtype=torch.long, device=logits.device)
    return constrain_logits(logits, depths.to(logits.device), bias, ends, banned, grammar)


def per_sequence(work) -> StepOutput | Exception | None:
    """Run one sequence's part of a batch step; its failure is returned, not raised."""
    try:
        return work()
    except Exception as exc:  # one sequence's fault (drafter, detokenizer): the batch goes on
        return exc


def accept(
    seqs: list[Sequence], proposals: list[DraftProposal], tree: DraftTree, logits: torch.Tensor,
) -> list[AcceptResult]:
    """One `AcceptResult` (batch of one) per row. Greedy rows are accepted together on the padded
    batch; a sampling row is accepted alone on its own unpadded tree, so its random draws (from its
    own generator) do not depend on what else is in the batch."""
    results: list[AcceptResult | None] = [None] * len(seqs)
    greedy = [row for row, seq in enumerate(seqs) if seq.params.greedy]
    if greedy:
        if len(greedy) == len(seqs):  # the whole batch: nothing to gather
            batch = greedy_accept(tree, logits)
        else:
            index = torch.tensor(greedy, device=logits.device)
            batch = greedy_accept(_rows(tree, index), logits.index_select(0, index))
        for i, row in enumerate(greedy):
            results[row] = AcceptResult(batch.accepted_nodes[i : i + 1], batch.num_accepted[i : i + 1],
                                        batch.emitted_tokens[i : i + 1])
    for row, seq in enumerate(seqs):
        if results[row] is None:
            own = proposals[row].tree
            results[row] = _sample_accept(proposals[row], logits[row : row + 1, : own.num_nodes], seq)
    return results


def _sample_accept(proposal: DraftProposal, logits: torch.Tensor, seq: Sequence) -> AcceptResult:
    """Lossless rejection sampling for one sequence (logits [1, N, V] of its own tree)."""
    probs = _probs(logits, seq.params.logits_params)  # the same processing for every token, bonus included
    if proposal.draft_probs is not None:
        draft_tokens = proposal.tree.tokens[:, 1:]
        return chain_sample_accept(draft_tokens, proposal.draft_probs, probs, seq.generator)
    return tree_sample_accept(proposal.tree, probs, seq.generator)


def _rows(tree: DraftTree, index: torch.Tensor) -> DraftTree:
    return DraftTree(tree.tokens.index_select(0, index), tree.parents.index_select(0, index),
                     tree.depths.index_select(0, index), tree.ancestors.index_select(0, index))


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


def _to_host(results: list[AcceptResult]) -> tuple[list[list[int]], list[list[int]]]:
    """Per row: accepted node indices (root first) and emitted tokens (drafts + bonus), in one host
    sync for the batch."""
    width = max(r.accepted_nodes.shape[1] for r in results)
    rows = [torch.cat([_pad(r.accepted_nodes[0], width), _pad(r.emitted_tokens[0], width)]) for r in results]
    flat = torch.stack(rows).tolist()
    paths, emitted = [], []
    for row in flat:
        path = [node for node in row[:width] if node >= 0]
        paths.append(path)
        emitted.append(row[width : width + len(path)])
    return paths, emitted


def _pad(values: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(values, (0, width - len(values)), value=-1)
