"""Model drafters draft a whole batch together: one drafter forward per step of the slowest session.

A model drafter (an EAGLE/MSD head, a draft LM) drafts a sequence with a few forwards: the catch-up of
what the target accepted, then one forward per tree level. Run one sequence at a time, a batch of B
sequences costs B times that, and the drafter reads its weights B times per level. Here each session
drafts as a generator (`Drafting`) that *yields* the forward it needs (`DraftForward`: its inputs,
positions and attention mask, at its own offset in its own slot of the drafter's `SlotCache`) and
receives the outputs (`DraftReply`). `drive` collects the pending forwards of every session, the
proposer runs them as one padded forward (`pad_forwards` builds the batch), and each session resumes
with its own rows. Sessions may be at different steps (one catching up, another at tree level 3):
every row carries its own offset, positions and mask.

Example: session a catches up 2 entries at offset 7, session b runs a level of 3 nodes at offset 4.
The padded forward has 3 new rows per slot: a's third row is padding that sees only itself (its
keys land past a's length, where nothing reads them); keys span max(7, 4) + 3 = 10 columns.

A fault in one session's own code (its tree shaping, its inputs) fails that session only; a fault in
the shared forward fails every session of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..kernels.kv_cache import SlotCache
from ..kernels.tree import additive_mask
from .base import DraftProposal


@dataclass(frozen=True)
class DraftForward:
    """One session's rows of a drafter forward."""

    inputs: Tensor  # [n] token ids (a draft LM) or [n, H] input vectors (a head)
    positions: Tensor  # [n] long position ids
    allowed: Tensor  # [n, offset + n] bool: the cache rows (and new rows) each input attends to
    offset: int  # rows the session's slot holds before these; the new rows are written after them
    scored: list[int]  # the rows whose next-token log-probs the session needs


@dataclass(frozen=True)
class DraftReply:
    outputs: Tensor | None  # [n, H] the drafter's output vectors (a head's predicted features), or None
    log_probs: Tensor  # [len(scored), V] next-token log-probs at the scored rows (float32, or float64)


# A session's drafting: yields forwards, is sent their replies, returns its proposal. Helpers that
# need forwards are generators of the same kind, composed with `yield from`.
Drafting = Generator[DraftForward, DraftReply, Any]
# The proposer's batched forward: slots and their sessions' forwards -> one reply per row.
RunForwards = Callable[[list[int], list[DraftForward]], list[DraftReply]]


def drive(slots: list[int], drafts: list[Drafting], run: RunForwards) -> list[Any]:
    """Run every session's drafting to its end, batching their pending forwards into one `run` per
    round. Returns each session's result, or the exception its own drafting raised; raises if `run`
    does (a failed shared forward leaves no session a usable state)."""
    results: dict[int, Any] = {}
    pending: dict[int, DraftForward] = {}

    def resume(i: int, reply: DraftReply | None) -> None:
        try:
            pending[i] = drafts[i].send(reply)
        except StopIteration as done:
            results[i] = done.value
        except Exception as exc:  # this session's own fault: the others go on
            results[i] = exc

    for i in range(len(drafts)):
        resume(i, None)
    while pending:
        rows = sorted(pending)
        forwards = [pending.pop(i) for i in rows]
        for i, reply in zip(rows, run([slots[i] for i in rows], forwards)):
            resume(i, reply)
    return [results[i] for i in range(len(drafts))]


def pad_forwards(forwards: list[DraftForward], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, int]:
    """The batch of `forwards`, each padded to the longest: inputs [B, n, ...] (zeros past a row's
    own), position ids [B, n], the additive mask [B, 1, n, width] (width = max offset + n) and n.
    A padding row attends only to itself, so it stays finite and no real row sees it."""
    n = max(len(f.inputs) for f in forwards)
    width = max(f.offset for f in forwards) + n
    device = forwards[0].inputs.device
    inputs = torch.zeros((len(forwards), n, *forwards[0].inputs.shape[1:]), dtype=forwards[0].inputs.dtype,
                         device=device)
    positions = torch.zeros(len(forwards), n, dtype=torch.long, device=device)
    allowed = torch.zeros(len(forwards), n, width, dtype=torch.bool, device=device)
    for b, f in enumerate(forwards):
        rows = len(f.inputs)
        inputs[b, :rows] = f.inputs
        positions[b, :rows] = f.positions
        positions[b, rows:] = f.positions[-1]
        allowed[b, :rows, : f.offset + rows] = f.allowed
        pad = torch.arange(rows, n, device=device)
        allowed[b, pad, f.offset + pad] = True
    return inputs, positions, additive_mask(allowed, dtype), n


def scored_rows(outputs: Tensor, forwards: list[DraftForward]) -> Tensor:
    """The scored rows of every forward, concatenated: [sum of len(scored), ...] from [B, n, ...]."""
    index = [b * outputs.shape[1] + row for b, f in enumerate(forwards) for row in f.scored]
    return outputs.flatten(0, 1)[torch.tensor(index, dtype=torch.long, device=outputs.device)]


def replies(outputs: Tensor | None, log_probs: Tensor, forwards: list[DraftForward]) -> list[DraftReply]:
    """Split a batch's results back into one reply per forward."""
    chunks = log_probs.split([len(f.scored) for f in forwards])
    return [DraftReply(outputs[b, : len(f.inputs)] if outputs is not None else None, chunks[b])
            for b, f in enumerate(forwards)]


def causal(offset: int, rows: int, device: torch.device) -> Tensor:
    """[rows, offset + rows] bool: new row i sees the `offset` cached rows and new rows 0..i."""
    return torch.arange(offset + rows, device=device) <= (offset + torch.arange(rows, device=device))[:, None]


class SlotProposer:
    """Base of the model drafters (a head, a draft LM): their sessions draft together through `drive`,
    each in its slot of the proposer's `SlotCache` (sized by `reserve`); `run` is the subclass's
    batched forward."""

    cache: SlotCache | None = None

    def run(self, slots: list[int], forwards: list[DraftForward]) -> list[DraftReply]:
        raise NotImplementedError

    def check_reserved(self) -> None:
        if self.cache is None:
            raise RuntimeError("reserve() the drafter's KV cache before opening sessions")

    @torch.inference_mode()
    def propose_batch(
        self, sessions: list[SlotSession], roots: list[int], grow: list[bool] | None = None,
    ) -> list[DraftProposal | Exception]:
        grow = grow or [True] * len(sessions)
        drafts = [s.drafting(r, g) for s, r, g in zip(sessions, roots, grow)]
        return drive([s.slot for s in sessions], drafts, self.run)


class SlotSession:
    """Base of a model drafter's session: its slot, the committed rows it holds there (`length`), and
    `drafting(root, grow)`, the subclass's generator."""

    proposer: SlotProposer
    slot: int
    length: int
    device: torch.device

    def drafting(self, root_token: int, grow: bool = True) -> Drafting:
        raise NotImplementedError

    def propose(self, root_token: int) -> DraftProposal:
        proposal = self.proposer.propose_batch([self], [root_token])[0]
        if isinstance(proposal, Exception):
            raise proposal
        return proposal

    def prefill(self, inputs: Tensor) -> None:
        """Run committed rows (the prompt, when the session opens) into the slot now, alone."""
        with torch.inference_mode():
            drive([self.slot], [self.append(inputs, scored=[])], self.proposer.run)

    def append(self, inputs: Tensor, scored: list[int]) -> Drafting:
        """Append committed rows (token ids [n] or input vectors [n, H]) causally after the slot's
        `length` rows; returns the reply."""
        n = len(inputs)
        positions = torch.arange(self.length, self.length + n, device=self.device)
        reply = yield DraftForward(inputs, positions, causal(self.length, n, self.device), self.length, scored)
        self.length += n
        return reply
