"""Speculative-decoding metrics of one request (or of many, merged).

Definitions (as EAGLE and MSD use them):

- mean accepted length (tau) = tokens emitted per verify step, INCLUDING the bonus token
  = 1 + accepted_draft_tokens / verify_steps, in [1, depth + 1];
- draft acceptance rate = accepted_draft_tokens / proposed_draft_tokens, where a tree's proposed
  tokens are all of its verified draft nodes (so a wide tree lowers this rate by construction);
- per-position acceptance rate[i] = verify steps whose depth-(i+1) node was accepted / verify steps.

`drafted_steps` counts the verify steps that checked at least one draft token. A step may check
none: the n-gram or suffix drafter found no match, the batch planner cut the tree to its root, or
the drafter is `none`. vLLM counts only such drafted steps as drafts, so its mean acceptance length
is 1 + accepted_draft_tokens / drafted_steps, higher than tau whenever some steps drafted nothing;
the Prometheus counters follow vLLM (`server/http/prometheus.py`). tau is what the speed follows.

Tokens emitted by prefill (the first token) are not counted: no draft was verified for it.

With a response format (structured output), `grammar_draft_tokens` counts the draft tokens the
grammar forced (they are part of the proposed draft tokens) and `accepted_grammar_tokens` those of
them that were accepted.

With `EngineConfig.profile` the engine also sums the wall time of its verify steps, split into drafting
(the drafter's propose + commit), verification (the target's tree forward) and the rest of the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecMetrics:
    verify_steps: int = 0
    proposed_draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_steps: int = 0
    grammar_draft_tokens: int = 0
    accepted_grammar_tokens: int = 0
    # Summed wall time of verify steps; stays 0 unless the engine profiles.
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    step_seconds: float = 0.0

    def observe(self, num_proposed: int, num_accepted: int) -> None:
        """Record one verify step that checked `num_proposed` draft nodes and accepted a path of
        `num_accepted` of them (bonus token not included)."""
        self.verify_steps += 1
        self.drafted_steps += int(num_proposed > 0)
        self.proposed_draft_tokens += num_proposed
        self.accepted_draft_tokens += num_accepted
        if len(self.accepted_per_position) < num_accepted:
            self.accepted_per_position.extend([0] * (num_accepted - len(self.accepted_per_position)))
        for pos in range(num_accepted):
            self.accepted_per_position[pos] += 1

    def merge(self, other: SpecMetrics) -> None:
        self.verify_steps += other.verify_steps
        self.drafted_steps += other.drafted_steps
        self.proposed_draft_tokens += other.proposed_draft_tokens
        self.accepted_draft_tokens += other.accepted_draft_tokens
        self.grammar_draft_tokens += other.grammar_draft_tokens
        self.accepted_grammar_tokens += other.accepted_grammar_tokens
        self.draft_seconds += other.draft_seconds
        self.verify_seconds += other.verify_seconds
        self.step_seconds += other.step_seconds
        for pos, count in enumerate(other.accepted_per_position):
            if pos < len(self.accepted_per_position):
                self.accepted_per_position[pos] += count
            else:
                self.accepted_per_position.append(count)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify step including the bonus token; 0.0 before the first step."""
        if self.verify_steps == 0:
            return 0.0
        return 1.0 + self.accepted_draft_tokens / self.verify_steps

    @property
    def acceptance_rate(self) -> float:
        if self.proposed_draft_tokens == 0:
            return 0.0
        return self.accepted_draft_tokens / self.proposed_draft_tokens

    @property
    def per_position_acceptance(self) -> list[float]:
        if self.verify_steps == 0:
            return []
        return [count / self.verify_steps for count in self.accepted_per_position]

    def to_dict(self) -> dict:
        return {
            "verify_steps": self.verify_steps,
            "drafted_steps": self.drafted_steps,
            "proposed_draft_tokens": self.proposed_draft_tokens,
            "accepted_draft_tokens": self.accepted_draft_tokens,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "accepted_per_position": list(self.accepted_per_position),
            "per_position_acceptance": [round(r, 4) for r in self.per_position_acceptance],
            "grammar_draft_tokens": self.grammar_draft_tokens,
            "accepted_grammar_tokens": self.accepted_grammar_tokens,
        }

    def timing_dict(self) -> dict:
        """Milliseconds per verify step: drafting, verification, other (acceptance, KV compaction, host
        sync, emit, Python bookkeeping) and the whole step, plus other's share of the step. Empty if the
        steps were not profiled. Kept out of `to_dict`, which is the API's `spec_decode` object."""
        if self.step_seconds == 0.0:
            return {}
        per_step = 1000.0 / self.verify_steps
        other = self.step_seconds - self.draft_seconds - self.verify_seconds
        return {
            "draft_ms": self.draft_seconds * per_step,
            "verify_ms": self.verify_seconds * per_step,
            "other_ms": other * per_step,
            "step_ms": self.step_seconds * per_step,
            "other_share": other / self.step_seconds,
        }
