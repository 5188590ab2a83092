"""Per-request state and the rules that end a request (EOS, token limit, stop strings)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...drafting.base import DraftSession
from .config import SamplingParams
from .detokenizer import IncrementalDetokenizer
from .grammar import GrammarState
from .metrics import SpecMetrics
from .outputs import PromptInput, StepOutput, TokenLogprob
from .planner import AcceptanceRate
from .target import PromptEmbeds


@dataclass
class PendingPrefill:
    """A prompt on its way into the KV cache, one chunk per engine turn."""

    prompt: PromptEmbeds
    hidden: list[torch.Tensor] = field(default_factory=list)  # chunks' last hidden states (for the drafter)


@dataclass
class Sequence:
    """One request being decoded. Between steps its KV slot holds every token but the root."""

    prompt: PromptInput
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None = None
    slot: int = -1  # the sequence's row of the engine's KV cache (`SlotCache`); -1 once released
    draft: DraftSession | None = None
    prefill: PendingPrefill | None = None  # between the first and the last chunk of the prompt
    root_token: int = -1  # last emitted token, not yet in the cache
    prefix_len: int = 0  # tokens in the target cache
    cached_tokens: int = 0  # prompt tokens found in the KV cache before the first chunk (prefix caching)
    rope_delta: int = 0  # position - cache index of every token after the prompt (M-RoPE after images)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # output text so far (stop strings excluded)
    sent: int = 0  # characters of `text` already returned to the caller
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    acceptance: AcceptanceRate = field(default_factory=AcceptanceRate)  # recent, for the batch planner
    grammar: GrammarState | None = None  # structured output: the matcher, advanced to the root
    finish_reason: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.token_ids)

    @property
    def cached_ids(self) -> list[int]:
        """The tokens whose KV rows the slot holds: the prompt, then the output but the root (which
        has not entered the cache); mid-prefill, the part of the prompt prefilled so far."""
        return (self.prompt.token_ids + self.output_ids)[: self.prefix_len]

    @property
    def prefilled(self) -> bool:
        return self.root_token >= 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def emit(self, tokens: list[int], logprobs: list[TokenLogprob] | None, depths: list[int]) -> StepOutput:
        """Append a step's tokens (`depths`: each one's origin, see `StepOutput`), stopping at EOS, the
        token limit or a stop string (which may end inside the step's run: everything after it is
        dropped). Returns what the caller may see."""
        ends = []  # length of `text` after each token
        for token in tokens:
            self.output_ids.append(token)
            if token in self.eos_token_ids and not self.params.ignore_eos:
                self.finish_reason = "stop"
            else:
                self.text += self.detokenizer.add(token)
                if len(self.output_ids) >= self.params.min_tokens and self._cut_at_stop_string():
                    self.finish_reason = "stop"
                elif len(self.output_ids) >= self.params.max_tokens:
                    self.finish_reason = "length"
            ends.append(len(self.text))
            if self.finished:
                break
        count, start = len(ends), self.sent
        end = len(self.text) if self.finished else len(self.text) - self._held_back()
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        # each token's share of the delta: up to where the text ended after it, within [start, end)
        bounds = [start] + [min(max(e, start), max(end, start)) for e in ends]
        token_texts = [self.text[a:b] for a, b in zip(bounds, bounds[1:])]
        kept_logprobs = logprobs[:count] if logprobs is not None else None
        return StepOutput(tokens[:count], delta, kept_logprobs, self.finished, self.finish_reason,
                          depths[:count], token_texts)

    def _cut_at_stop_string(self) -> bool:
        # Only the tail can hold a new match: the text before it was checked at earlier tokens.
        longest = max((len(s) for s in self.params.stop), default=0)
        start = max(0, self.sent - longest)
        hits = [i for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _held_back(self) -> int:
        """Length of the longest text suffix that could still grow into a stop string."""
        for size in range(min(len(self.text), max((len(s) for s in self.params.stop), default=0)), 0, -1):
            suffix = self.text[-size:]
            if any(s.startswith(suffix) for s in self.params.stop):
                return size
        return 0
