"""The engine: prefill, then speculative steps (`step.py`), one sequence at a time.

`start` makes a `Sequence`; each `step` advances it by one target forward (prefill, or verify of a
draft tree) and returns what it emitted. `generate` and `stream` loop over `step`; the scheduler
(`scheduler.py`) interleaves the steps of many sequences on one worker thread.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoProcessor, AutoTokenizer

from ...drafting.base import Proposer
from ..store.registry import default_draft
from ..store.resolve import resolve_model
from .calibration import calibrate_tree_nodes
from .config import EngineConfig, SamplingParams
from .detokenizer import IncrementalDetokenizer
from .drafters import make_proposer
from .errors import RequestError
from .loading import eos_token_ids, load_adapter, load_draft_model
from .outputs import GenerationOutput, PromptInput, StepOutput, TokenLogprob
from .profiling import Stopwatch
from .prompts import PromptBuilder
from .sequence import Sequence
from .step import prefill, speculative_step
from .target import TargetModel


class Engine:
    def __init__(
        self, config: EngineConfig, target: TargetModel, tokenizer, processor=None,
        proposer: Proposer | None = None,
    ) -> None:
        """`proposer` overrides the drafter that `config.draft` names (for embedding custom drafters)."""
        if config.draft == "auto":
            config = replace(config, draft=default_draft(config.model))
        self.config = config
        self.target = target
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, processor, target.is_multimodal)
        self.proposer = proposer or make_proposer(
            config, target, lambda spec: load_draft_model(spec, config),
            lambda spec: resolve_model(spec, Path(config.cache_dir) if config.cache_dir else None),
        )
        self.model_name = config.model
        self.max_model_len = min(config.max_model_len or target.max_context, target.max_context)
        self.eos_token_ids = eos_token_ids(target.model, tokenizer)
        self.stopwatch = Stopwatch(config.profile, target.device)

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        """Load the target (and draft) named by `config`: store alias, folder, .gguf file or hub id."""
        path, adapter = load_adapter(config.model, config.cache_dir, config.dtype, config.device)
        target = TargetModel(adapter)
        if config.calibrate_tree:
            nodes, _ = calibrate_tree_nodes(target)
            config = replace(config, tree=replace(config.tree, draft_nodes=nodes))
        tokenizer = AutoTokenizer.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path) if target.is_multimodal else None
        return cls(config, target, tokenizer, processor)

    @property
    def is_multimodal(self) -> bool:
        return self.target.is_multimodal

    def prepare_chat(self, messages: list[dict]) -> PromptInput:
        return self.prompts.chat(messages)

    def prepare_text(self, prompt: str | list[int]) -> PromptInput:
        return self.prompts.text(prompt)

    def start(self, prompt: PromptInput, params: SamplingParams) -> Sequence:
        """A new sequence; raises `RequestError` if it cannot fit the context. Prefill is its first step."""
        if len(prompt.token_ids) == 0:
            raise RequestError("the prompt is empty", param="prompt")
        if len(prompt.token_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt.token_ids)} tokens and max_tokens is {params.max_tokens}, "
                f"more than this model's context of {self.max_model_len} tokens",
                param="max_tokens",
            )
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.target.device)
            generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        return Sequence(
            prompt, params, IncrementalDetokenizer(self.tokenizer, prompt.token_ids),
            self.eos_token_ids, generator,
        )

    @torch.inference_mode()
    def step(self, seq: Sequence) -> StepOutput:
        """Advance `seq` by one target forward (prefill, or one speculative step)."""
        if seq.finished:
            raise ValueError("the sequence has finished")
        if seq.cache is None:
            return prefill(seq, self.target, self.proposer)
        with self.stopwatch.adds_to(seq.metrics, "step_seconds"):
            return speculative_step(seq, self.target, self.proposer, self.stopwatch)

    def release(self, seq: Sequence) -> None:
        """Free the sequence's KV memory (target and drafter); safe to call twice."""
        if seq.draft is not None:
            seq.draft.close()
        seq.cache, seq.draft = None, None
        if seq.finish_reason is None:
            seq.finish_reason = "abort"

    def stream(self, prompt: PromptInput, params: SamplingParams) -> Iterator[StepOutput]:
        seq = self.start(prompt, params)
        try:
            while not seq.finished:
                yield self.step(seq)
        finally:
            self.release(seq)

    def generate(self, prompt: PromptInput, params: SamplingParams) -> GenerationOutput:
        seq = self.start(prompt, params)
        logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        try:
            while not seq.finished:
                out = self.step(seq)
                if logprobs is not None:
                    logprobs += out.logprobs
        finally:
            self.release(seq)
        return GenerationOutput(
            seq.text, seq.output_ids, seq.finish_reason, seq.prompt_len, seq.metrics, logprobs
        )
