"""The engine: prefill, then speculative steps, one sequence at a time.

`start` makes a `Sequence`; each `step` advances it by one target forward (prefill, or verify of a
draft tree) and returns what it emitted. `generate` and `stream` loop over `step`; the HTTP scheduler
interleaves the steps of many sequences on one worker thread.
"""

from __future__ import annotations

import random
from dataclasses import replace
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoProcessor, AutoTokenizer

from ..drafting.base import DraftContext, DraftProposal, Proposer
from ..drafting.quantize import quantize_draft_model
from ..drafting.registry import make_proposer
from ..kernels.acceptance import AcceptResult, chain_sample_accept, greedy_accept, tree_sample_accept
from ..kernels.kv_cache import compact_cache
from ..kernels.sampling import logprobs_topk, process_logits, sample
from .calibration import calibrate_tree_nodes
from .config import EngineConfig, SamplingParams
from .detokenizer import IncrementalDetokenizer
from .errors import RequestError
from .outputs import GenerationOutput, PromptInput, StepOutput, TokenLogprob
from .profiling import Stopwatch
from .prompts import PromptBuilder
from .sequence import Sequence
from .store.registry import default_draft
from .store.resolve import hub_error_message, resolve_model
from .target import CausalLMAdapter, TargetModel, load_model


class ModelLoadError(RuntimeError):
    """A model named on the command line or in a config could not be loaded."""


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
        self.eos_token_ids = _eos_ids(target.model, tokenizer)
        self.stopwatch = Stopwatch(config.profile, target.device)

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        """Load the target (and draft) named by `config`: store alias, folder, .gguf file or hub id."""
        path, adapter = _load(config.model, config.cache_dir, config.dtype, config.device)
        target = TargetModel(adapter)
        if config.calibrate_tree:
            nodes, _ = calibrate_tree_nodes(target)
            config = replace(config, tree=replace(config.tree, nodes=nodes))
        tokenizer = AutoTokenizer.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path) if target.is_multimodal else None
        return cls(config, target, tokenizer, processor)

    @property
    def is_multimodal(self) -> bool:
        return self.target.is_multimodal

    def prepare_chat(self, messages: list[dict]) -> PromptInput:
        """Template, tokenize and process images. It only reads the tokenizer and processor, so it
        may run on another thread than the one stepping (the HTTP server prepares in a pool)."""
        return self.prompts.chat(messages)

    def prepare_text(self, prompt: str | list[int]) -> PromptInput:
        return self.prompts.text(prompt)

    def check_image_size(self, width: int, height: int) -> None:
        """Raise `RequestError` for an image this model's processor should not be given (an extreme
        aspect ratio, too many pixels once resized); `prepare_chat` checks every image with it."""
        self.prompts.check_image_size(width, height)

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
            return self._prefill(seq)
        with self.stopwatch.adds_to(seq.metrics, "step_seconds"):
            return self._speculative_step(seq)

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

    def _prefill(self, seq: Sequence) -> StepOutput:
        seq.cache = self.target.new_cache()
        out = self.target.prefill(seq.prompt, seq.cache)
        needs_hidden = self.proposer.needs_hidden_states
        seq.draft = self.proposer.open(DraftContext(
            seq.prompt.token_ids, seq.params, seq.generator,
            hidden=out.hidden[0] if needs_hidden else None,
            inputs_embeds=out.inputs_embeds[0] if needs_hidden else None,
            image_mask=out.image_mask[0] if needs_hidden else None,
        ))
        if seq.params.greedy:
            token = out.last_logits.argmax(-1)
        else:
            token = sample(self._probs(out.last_logits, seq.params), seq.generator)
        seq.root_token = int(token)
        seq.prefix_len = seq.prompt_len
        return seq.emit([seq.root_token], self._logprobs(out.last_logits, token, seq.params))

    def _speculative_step(self, seq: Sequence) -> StepOutput:
        # 1. propose: a draft tree rooted at the last emitted token
        with self.stopwatch.adds_to(seq.metrics, "draft_seconds"):
            proposal = seq.draft.propose(seq.root_token)
        tree = proposal.tree
        # 2. verify: the target scores every tree node in one forward
        with self.stopwatch.adds_to(seq.metrics, "verify_seconds"):
            out = self.target.verify(tree, seq.cache, seq.prefix_len)
        # 3. accept: the longest path the target agrees with, plus a bonus token (one host sync)
        result = self._accept(proposal, out.logits, seq)
        path, emitted = _to_host(result)
        # 4. compact: the accepted path's KV rows move right after the prefix, the rest is dropped
        compact_cache(seq.cache, seq.prefix_len, result.accepted_nodes[:, : len(path)])
        seq.prefix_len += len(path)
        # 5. update the drafter with what entered the cache (root + accepted drafts)
        hidden = out.hidden[0, path] if self.proposer.needs_hidden_states else None
        with self.stopwatch.adds_to(seq.metrics, "draft_seconds"):
            seq.draft.commit([seq.root_token] + emitted[:-1], hidden)
        seq.root_token = emitted[-1]
        seq.metrics.observe(tree.num_nodes - 1, len(path) - 1)
        # 6. emit: accepted drafts + bonus; stop conditions may cut the run
        path_logits = out.logits[0, path]
        return seq.emit(emitted, self._logprobs(path_logits, torch.tensor(emitted), seq.params))

    def _accept(self, proposal: DraftProposal, logits: torch.Tensor, seq: Sequence) -> AcceptResult:
        """Greedy acceptance at temperature 0; otherwise lossless rejection sampling."""
        if seq.params.greedy:
            return greedy_accept(proposal.tree, logits)
        probs = self._probs(logits, seq.params)  # the same processing for every token, bonus included
        if proposal.draft_probs is not None:
            draft_tokens = proposal.tree.tokens[:, 1:]
            return chain_sample_accept(draft_tokens, proposal.draft_probs, probs, seq.generator)
        return tree_sample_accept(proposal.tree, probs, seq.generator)

    @staticmethod
    def _probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        return process_logits(logits, params.temperature, params.top_p, params.top_k)

    @staticmethod
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


def _eos_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


def load_draft_model(spec: str, config: EngineConfig) -> torch.nn.Module:
    """The draft LM `spec` in `config`'s dtype and device, or as dynamic int8 if `config` asks (CPU)."""
    int8 = config.draft_quantization == "int8"
    model = _load(spec, config.cache_dir, "float32" if int8 else config.dtype, config.device)[1].model
    return quantize_draft_model(model) if int8 else model


def _load(spec: str, cache_dir: str | None, dtype: str, device: str) -> tuple[str, CausalLMAdapter]:
    """Resolve `spec` through the model store and load it; a hub id that cannot be loaded (no hub
    here) becomes a `ModelLoadError` with a message that says what `--model` accepts."""
    path = resolve_model(spec, Path(cache_dir) if cache_dir else None)
    try:
        return str(path), load_model(str(path), dtype, device)
    except OSError as exc:
        if isinstance(path, Path):
            raise
        raise ModelLoadError(hub_error_message(spec, exc)) from exc
