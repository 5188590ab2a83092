"""The engine: chunked prefill, then batched speculative steps (`step.py`).

`start` makes a `Sequence` in a free KV slot; `step_batch` advances a batch of them by one turn (the
next prompt chunk of new ones, one verify forward for all the others) and returns what each emitted.
Prefix caching: before its first chunk a sequence takes the rows of the longest prefix of its prompt
that any slot holds (one that finished, or one still running, even one prefilled earlier in the same
turn), so it prefills only the rest.
`generate` and `stream` drive one sequence through `step`; the scheduler (`scheduler.py`) drives
many on one worker thread, batching every active sequence each turn.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ...drafting.base import Proposer
from ...drafting.none import NoDraftProposer
from ...drafting.shaper import draft_rows, largest_tree
from ...kernels.kv_cache import SlotCache
from ..store.registry import default_draft
from ..store.resolve import resolve_model
from .calibration import calibrate_tree_nodes, measure_step_costs
from .config import EngineConfig, GiB, ResponseFormat, SamplingParams
from .detokenizer import IncrementalDetokenizer
from .drafters import make_proposer
from .errors import RequestError
from .grammar import GrammarCompiler
from .loading import ModelLoadError, eos_token_ids, load_adapter, load_draft_model
from .outputs import GenerationOutput, PromptInput, StepOutput, TokenLogprob
from .planner import BatchPlanner, GoodputPlanner, SharePlanner
from .profiling import Stopwatch
from .prompts import PromptBuilder
from .sequence import Sequence
from .step import per_sequence, prefill, speculative_step
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
            lambda spec: resolve_model(spec, Path(config.cache_dir) if config.cache_dir else None), len(tokenizer),
        )
        self.model_name = config.model
        self.max_model_len = min(config.max_model_len or target.max_context, target.max_context)
        self.eos_token_ids = eos_token_ids(target.model, tokenizer)
        self.grammars = GrammarCompiler(tokenizer, target.config.vocab_size, self.eos_token_ids)
        self.stopwatch = Stopwatch(config.profile, target.device)
        self.cache = self._allocate_kv(config)
        self.planner = self._planner(config)
        self.free_slots = list(range(self.cache.num_slots))  # lowest first: batches stay contiguous
        self.active: dict[int, Sequence] = {}  # slot -> its sequence
        # prefix caching: free slot -> the tokens whose KV rows its last sequence left there
        self.slot_tokens: dict[int, list[int]] = {}
        # the same for the slots of sequences started but not yet given their first prompt chunk, which
        # look for their prefix only then (`_reuse_prefix`)
        self.unclaimed: dict[int, list[int]] = {}
        # share of the KV rows in use, updated by the engine's own thread; others (a metrics scrape)
        # only read this float, never the sequences
        self.kv_cache_usage = 0.0

    def _allocate_kv(self, config: EngineConfig) -> SlotCache:
        """Slots of `max_model_len` tokens (plus room for one draft tree) within the memory budget,
        which also holds the model drafter's own cache (one slot per sequence)."""
        capacity = self.max_model_len + largest_tree(config.tree)
        draft_capacity = self.max_model_len + draft_rows(config.tree)
        per_sequence = (capacity * self.target.kv_bytes_per_token()
                        + draft_capacity * self.proposer.kv_bytes_per_token())
        slots = min(config.max_num_seqs, int(config.kv_cache_memory_gib * GiB) // per_sequence)
        if slots < 1:
            raise ModelLoadError(
                f"a KV cache of {config.kv_cache_memory_gib} GiB cannot hold one sequence of "
                f"{self.max_model_len} tokens ({per_sequence / GiB:.2f} GiB); raise --kv-cache-memory "
                f"or lower --max-model-len")
        self.proposer.reserve(slots, draft_capacity)
        return self.target.new_cache(slots, capacity)

    def _planner(self, config: EngineConfig) -> BatchPlanner:
        """How much of each row's tree a batch's forward carries: a fixed share of
        `batch_tree_tokens` if set, else whatever maximises expected tokens per second on the verify
        cost measured here (nothing to measure without a drafter)."""
        if config.batch_tree_tokens is not None or isinstance(self.proposer, NoDraftProposer):
            return SharePlanner(config.batch_tree_tokens or 0)
        return GoodputPlanner(measure_step_costs(self.target, self.num_slots * largest_tree(config.tree)),
                              packed=self.target.packs, one_call=self.target.one_call_nodes)

    @property
    def num_slots(self) -> int:
        """Sequences the KV cache holds at once: the most a batch can carry."""
        return self.cache.num_slots

    def _count_kv_usage(self) -> None:
        used = sum(seq.prefix_len for seq in self.active.values())
        self.kv_cache_usage = used / (self.cache.num_slots * self.cache.capacity)

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        """Load the target (and draft) named by `config`: store alias, folder, .gguf file or hub id."""
        path, adapter = load_adapter(config.model, config.cache_dir, config.dtype, config.device,
                                     config.prepack_weights, config.attention, config.quantization)
        target = TargetModel(adapter)
        if config.calibrate_tree:
            nodes, _ = calibrate_tree_nodes(target)
            config = replace(config, tree=replace(config.tree, draft_nodes=nodes))
        tokenizer = AutoTokenizer.from_pretrained(path)
        processor = adapter.load_processor(path) if target.is_multimodal else None
        if config.chat_template is not None:
            for owner in (tokenizer, processor):
                if owner is not None:
                    owner.chat_template = config.chat_template
        return cls(config, target, tokenizer, processor)

    @property
    def is_multimodal(self) -> bool:
        return self.target.is_multimodal

    def prepare_chat(self, messages: list[dict], tools: list[dict] | None = None) -> PromptInput:
        """Template (with `tools`, OpenAI function tools, if given), tokenize and process images. It
        only reads the tokenizer and processor, so it may run on another thread than the one stepping
        (the HTTP server prepares in a pool)."""
        prompt = self.prompts.chat(messages, tools)
        self.target.adapter.check_prompt(prompt)
        return prompt

    def prepare_text(self, prompt: str | list[int]) -> PromptInput:
        return self.prompts.text(prompt)

    def check_image_size(self, width: int, height: int) -> None:
        """Raise `RequestError` for an image this model's processor should not be given (an extreme
        aspect ratio, too many pixels once resized); `prepare_chat` checks every image with it."""
        self.prompts.check_image_size(width, height)

    def check_response_format(self, fmt: ResponseFormat) -> None:
        """Compile `fmt`'s grammar (cached) or raise `RequestError`; thread-safe, so the HTTP server
        compiles in its prepare pool and `start` finds the grammar ready."""
        self.grammars.grammar(fmt)

    def start(self, prompt: PromptInput, params: SamplingParams) -> Sequence:
        """A new sequence in the lowest free KV slot (running batches stay a contiguous range of slots,
        which the cache reads without a copy); raises `RequestError` if it cannot fit the context.
        Prefill is its first step."""
        if len(prompt.token_ids) == 0:
            raise RequestError("the prompt is empty", param="prompt")
        if len(prompt.token_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt.token_ids)} tokens and max_tokens is {params.max_tokens}, "
                f"more than this model's context of {self.max_model_len} tokens",
                param="max_tokens",
            )
        vocab = self.target.config.vocab_size
        if any(not 0 <= token < vocab for token, _ in params.logit_bias):
            raise RequestError(f"logit_bias names a token outside this model's vocabulary of {vocab}",
                               param="logit_bias")
        grammar = self.grammars.state(params.response_format) if params.response_format is not None else None
        if not self.free_slots:
            raise RuntimeError(f"all {self.num_slots} KV slots hold running sequences; release one first")
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.target.device)
            generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        slot = self.free_slots.pop(0)
        held = self.slot_tokens.pop(slot, [])  # the new sequence will overwrite them: no longer free to take
        if self._reuses_prefixes(prompt):
            self.unclaimed[slot] = held  # still offered until the sequence's first chunk
        seq = Sequence(prompt, params, IncrementalDetokenizer(self.tokenizer, prompt.token_ids),
                       self.eos_token_ids, generator, slot=slot, grammar=grammar)
        self.active[seq.slot] = seq
        return seq

    def _reuses_prefixes(self, prompt: PromptInput) -> bool:
        """Prefix caching takes text prompts only, and not with a drafter that reads the target's hidden
        states of the whole prompt (an EAGLE/MSD head)."""
        return self.config.prefix_caching and not prompt.num_images and not self.proposer.needs_hidden_states

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Before `seq`'s first chunk: give it the longest prefix its prompt shares with any slot, never
        the whole prompt (the last prompt token's logits give the first output token). Looking only now
        rather than at `start` finds what sequences admitted together prefilled before it (a burst of
        requests with one system prompt prefills it once). Rows found in another slot are copied over,
        and stay there for the next prompt."""
        held = self.unclaimed.pop(seq.slot)
        ids, limit = seq.prompt.token_ids, seq.prompt_len - 1
        source, cached = seq.slot, shared_prefix(held, ids, limit)
        for other, tokens in self._cached_prefixes():
            shared = shared_prefix(tokens, ids, limit)
            if shared > cached:
                source, cached = other, shared
        if source != seq.slot:
            self.cache.copy_prefix(source, seq.slot, cached)
        seq.prefix_len = seq.cached_tokens = cached

    def _cached_prefixes(self) -> Iterator[tuple[int, list[int]]]:
        """Every slot with the tokens whose KV rows it holds: free slots and those of sequences not yet
        prefilling as their last sequence left them, running text sequences' prompt and output so far."""
        yield from self.slot_tokens.items()
        yield from self.unclaimed.items()
        for slot, seq in self.active.items():
            if not seq.prompt.num_images:
                yield slot, seq.cached_ids

    def step(self, seq: Sequence) -> StepOutput:
        """Advance `seq` until it emits: its whole prefill (chunk by chunk), or one speculative step."""
        out = None
        while out is None:
            out = self.step_batch([seq])[0]
        if isinstance(out, Exception):
            raise out
        return out

    @torch.inference_mode()
    def step_batch(self, seqs: list[Sequence]) -> list[StepOutput | Exception | None]:
        """Advance every sequence by one step: new sequences take the next chunk of their prompts (up to
        `prefill_chunk_tokens` prompt tokens per turn over all of them, first come first served, one
        forward each; a chunk that starts a bidirectional block takes all of it, which may overdraw the
        turn's budget), all the others are verified together in ONE target forward. Results come in
        the order of `seqs`: None for a sequence still prefilling (nothing to emit yet), the
        exception for a sequence whose own part failed (only it), else its output."""
        if any(seq.finished or seq.slot < 0 for seq in seqs):
            raise ValueError("a sequence has finished or been released")
        outputs: dict[int, StepOutput | Exception | None] = {}
        budget = self.config.prefill_chunk_tokens or max(seq.prompt_len for seq in seqs)
        for seq in seqs:
            if not seq.prefilled:
                if budget > 0 and seq.slot in self.unclaimed:
                    failed = per_sequence(lambda: self._reuse_prefix(seq))  # None: done
                    if failed is not None:
                        outputs[id(seq)] = failed
                        continue
                start = seq.prefix_len
                outputs[id(seq)] = per_sequence(
                    lambda: prefill(seq, self.target, self.proposer, self.cache, budget)) if budget > 0 else None
                budget -= seq.prefix_len - start  # the chunk prefill took, which may differ from the budget
        decoding = [seq for seq in seqs if id(seq) not in outputs]
        if decoding:
            with self.stopwatch.adds_to([seq.metrics for seq in decoding], "step_seconds"):
                steps = speculative_step(decoding, self.target, self.proposer, self.cache, self.stopwatch,
                                         self.planner, self.config.grammar_draft_tokens)
            outputs.update(zip(map(id, decoding), steps))
        self._count_kv_usage()
        return [outputs[id(seq)] for seq in seqs]

    def release(self, seq: Sequence) -> None:
        """Free the sequence's KV slot and its drafter's memory; safe to call twice."""
        if seq.draft is not None:
            seq.draft.close()
        seq.draft = None
        if seq.slot >= 0:
            held = self.unclaimed.pop(seq.slot, None)  # left before its first chunk: the rows are untouched
            if self.config.prefix_caching and not seq.prompt.num_images:
                self.slot_tokens[seq.slot] = seq.cached_ids if held is None else held
            del self.active[seq.slot]
            bisect.insort(self.free_slots, seq.slot)
            seq.slot = -1
            self._count_kv_usage()
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


def shared_prefix(cached: list[int], ids: list[int], limit: int) -> int:
    """How many leading tokens `cached` and `ids` share, at most `limit`."""
    for i, (a, b) in enumerate(zip(cached, ids[:limit])):
        if a != b:
            return i
    return min(len(cached), len(ids), limit)
