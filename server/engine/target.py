"""The target model: the model whose output speculative decoding must reproduce exactly.

One wrapper serves every HF causal LM and the LLaVA and Qwen2-VL vision-language families. Model
families differ only in where their parts live (decoder, LM head, token embeddings, vision tower)
and in how prompt tokens map to rotary positions; a small adapter per config class says so
(`adapters.py`, `qwen2_vl.py`). Tree verification passes the tree's 4D additive mask and position
ids as ordinary forward arguments. A batch of trees of different sizes runs *packed* where the
decoder's attention is `kernels.grouped_attention` (the module docstrings there and in
`kernels.kv_cache`): its linear layers see only the real nodes, no padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    MODEL_FOR_MULTIMODAL_LM_MAPPING,
    AutoConfig,
    Gemma3Config,
    Idefics3Config,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    PretrainedConfig,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen3VLConfig,
    SmolVLMConfig,
)

from ...kernels import cpu_attention, grouped_attention
from ...kernels.blocks import chunk_end, prefill_mask
from ...kernels.cpu_linear import packed_linear_class, prepack_linears
from ...kernels.kv_cache import SlotCache, head_dim, kv_bytes_per_token
from ...kernels.tree import FULL, SLIDING, DraftTree, LayerMasks
from ...kernels.weight_only import QUANTIZATION_BITS, WeightOnlyLinear, can_quantize, quantize_linears
from .adapters import CausalLMAdapter, LlavaAdapter, RopeIndex
from .gemma3 import Gemma3Adapter
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from .outputs import PromptInput, image_tensors
from .qwen2_vl import Qwen2VLAdapter, Qwen3VLAdapter

TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor  # [B, N, V] float32 (or float64 for a float64 model)
    hidden: torch.Tensor  # [B, N, H] the decoder's last (final-norm) hidden states


@dataclass(frozen=True)
class PromptEmbeds:
    embeds: torch.Tensor  # [1, L, H] what the decoder consumes (visual embeddings at image slots)
    image_mask: torch.Tensor  # [1, L] bool, True at image placeholder positions
    rope: RopeIndex | None = None  # M-RoPE positions of a prompt with images; None: position = index
    blocks: torch.Tensor | None = None  # [L] bidirectional block id per token, -1 outside (`kernels.blocks`)
    deepstack: list[torch.Tensor] | None = None  # per early decoder layer: [num_image_tokens, H] (Qwen3-VL)
    masks: LayerMasks = LayerMasks()  # how the decoder takes a block mask (`TargetModel.layer_masks`)

    def chunk_end(self, start: int, end: int) -> int:
        """Where a prefill chunk [start, end) ends so that it cuts no bidirectional block."""
        return end if self.blocks is None else chunk_end(self.blocks, start, end)

    def chunk_inputs(self, start: int, end: int) -> dict:
        """The decoder's inputs for prompt tokens [start, end) beyond their embeddings, by family: M-RoPE
        `position_ids` [3, 1, n]; an `attention_mask` where the chunk holds bidirectional blocks (whole
        ones, `chunk_end`); the chunk's rows of the deepstack features and where its image tokens are.
        {}: a causal chunk at positions = cache indices, the decoder's own defaults."""
        inputs = {}
        if self.rope is not None:
            inputs["position_ids"] = self.rope.position_ids[..., start:end]
        if self.blocks is not None:
            blocks, dtype = self.blocks[start:end], self.embeds.dtype
            inputs["attention_mask"] = self.masks(lambda window: prefill_mask(blocks, start, dtype, window))
        chunk_images = self.image_mask[:, start:end]
        if self.deepstack is not None and chunk_images.any():
            first = int(self.image_mask[:, :start].sum())  # image rows of the earlier chunks
            rows = slice(first, first + int(chunk_images.sum()))
            inputs["visual_pos_masks"] = chunk_images
            inputs["deepstack_visual_embeds"] = [features[rows] for features in self.deepstack]
        return inputs

    @property
    def rope_delta(self) -> int:
        """Position - cache index of every token after the prompt (what `verify` adds to positions)."""
        return 0 if self.rope is None else self.rope.rope_delta


# Model families keyed by config class: a new family registers here instead of adding a name check.
ADAPTERS: dict[type[PretrainedConfig], type[CausalLMAdapter]] = {
    LlavaConfig: LlavaAdapter,
    LlavaNextConfig: LlavaNextAdapter,
    LlavaOnevisionConfig: LlavaOnevisionAdapter,
    Qwen2VLConfig: Qwen2VLAdapter,
    Qwen2_5_VLConfig: Qwen2VLAdapter,
    Qwen3VLConfig: Qwen3VLAdapter,
    Gemma3Config: Gemma3Adapter,
    Idefics3Config: Idefics3Adapter,
    SmolVLMConfig: SmolVLMAdapter,
}


def load_model(path: str, dtype: str, device: str, prepack: bool = False,
               attention: str = "kernel", quantization: str = "none") -> CausalLMAdapter:
    """Load a model folder (or hub id) into the adapter its config class calls for.

    `quantization` ("int8", "int4"; CPU): the decoder's linear layers hold weight-only int8 / int4
    weights (`kernels.weight_only`), the LM head int8 (as llama.cpp's 4-bit files keep their output
    layer at 8 bits). `prepack` (CPU): the linear layers left in the model's dtype use a packed linear
    where one exists for it (`kernels.cpu_linear`: oneDNN for float32 and native bfloat16, fbgemm's
    half-precision GEMM for bfloat16 / float16 elsewhere). The vision tower, run once per image, keeps
    torch's own.
    `attention="grouped"`: a grouped-query model that would run transformers' `sdpa` attention runs
    `kernels.grouped_attention` instead (the same SDPA kernel, keys and values read once per group);
    `"kernel"` (the default) the same with its few-token calls on the CPU on `kernels.cpu_attention`'s
    kernel (where it cannot be built: `"grouped"`, with a warning); `"sdpa"` keeps transformers' own."""
    if quantization != "none" and torch.device(device).type != "cpu":
        raise ValueError(f"--quantization {quantization} runs on CPU only (torch's weight-only kernels), "
                         f"not on {device}")
    config = AutoConfig.from_pretrained(path)
    check_supported(config)
    adapter_cls = ADAPTERS.get(type(config), CausalLMAdapter)
    model = adapter_cls.model_class.from_pretrained(path, dtype=TORCH_DTYPES[dtype]).to(device).eval()
    adapter = adapter_cls(model)
    if (attention in ("grouped", "kernel") and model.config._attn_implementation == "sdpa"
            and grouped_attention.uses_grouped_query(adapter.text_config)):
        kernel = attention == "kernel" and model.device.type == "cpu" and cpu_attention.available()
        model.set_attn_implementation(grouped_attention.register(kernel))
    if quantization != "none":
        quantize_linears(adapter.decoder, QUANTIZATION_BITS[quantization])
        head = model.get_output_embeddings()
        if can_quantize(head, 8):  # a tied head keeps its float weight (the embeddings'): an EAGLE head reads it
            tied = head.weight is model.get_input_embeddings().weight
            model.set_output_embeddings(WeightOnlyLinear(head, 8, keep_weight=tied))
    packed = packed_linear_class(model.dtype, model.device) if prepack else None
    if packed is not None:
        prepack_linears(adapter.decoder, packed)
        head = model.get_output_embeddings()
        if isinstance(head, nn.Linear) and packed.fits(head):
            model.set_output_embeddings(packed(head, keep_weight=True))
    return adapter


def check_supported(config: PretrainedConfig) -> None:
    """Raise ValueError, before any weights load, for a model the engine cannot serve exactly.

    Served: the families in `ADAPTERS`, and text-only causal LMs (`AutoModelForCausalLM`) whose layers
    all attend over the KV cache (full or sliding-window attention). Refused: a multimodal config not in
    `ADAPTERS` (transformers files it under image-text-to-text or multimodal LMs, or it holds a
    `vision_config` / `audio_config`): as a causal LM it would load without its images, if at all; a
    config that is no causal LM; `layer_types` of other kinds (linear / recurrent, chunked attention)."""
    kind = type(config)
    if kind in ADAPTERS:
        return
    sub_configs = set(getattr(config, "sub_configs", None) or ())
    if (kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING or kind in MODEL_FOR_MULTIMODAL_LM_MAPPING
            or sub_configs & {"vision_config", "audio_config"}):
        families = ", ".join(sorted(cls.__name__ for cls in ADAPTERS))
        raise ValueError(f"{kind.__name__} ({config.model_type}) is a multimodal model family specserve does not "
                         f"serve; vision-language families served: {families}; text-only causal LMs load "
                         "through AutoModelForCausalLM")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{kind.__name__} ({config.model_type}) is not a causal language model "
                         "(AutoModelForCausalLM has no class for it)")
    others = set(getattr(config, "layer_types", None) or ()) - {FULL, SLIDING}
    if others:
        raise ValueError(f"{kind.__name__} has {', '.join(sorted(others))} layers; the KV slot cache serves "
                         f"{FULL} and {SLIDING} layers only")


class TargetModel:
    """Prefill (one sequence) and tree verification (a batch of sequences) for one target model."""

    def __init__(self, adapter: CausalLMAdapter) -> None:
        self.adapter = adapter
        self.model = adapter.model
        self.config = adapter.text_config
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.embed_tokens = self.model.get_input_embeddings()
        self.lm_head = self.model.get_output_embeddings()
        # Gemma-2/3 style logit soft-capping is part of the model's distribution, so keep it.
        self.softcap = getattr(self.config, "final_logit_softcapping", None)

    @property
    def is_multimodal(self) -> bool:
        return self.adapter.image_token_id is not None

    @property
    def max_context(self) -> int:
        """Longest sequence served: the model's `max_position_embeddings`. Sliding-window models too:
        the cache keeps every row and their sliding layers' masks hide what lies past the window
        (`layer_masks`), so a context longer than the window is served exactly."""
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def packs(self) -> bool:
        """Whether a batch of trees of different sizes may run without its padding nodes (`verify`): the
        decoder's attention is `grouped_attention`'s, which can attend a packed batch row by row."""
        return self.config._attn_implementation in grouped_attention.NAMES

    @cached_property
    def one_call_nodes(self) -> int:
        """Trees up to this many nodes attend a packed batch in one call (on `cpu_attention`'s kernel,
        which makes packing pay for any padding, `kernels.tree.worth_packing`); 0: none do."""
        kernel = (self.config._attn_implementation == grouped_attention.KERNEL_NAME and self.device.type == "cpu"
                  and cpu_attention.takes(self.dtype, head_dim(self.adapter.text_config), 1))
        return cpu_attention.MAX_TOKENS if kernel else 0

    @cached_property
    def layer_masks(self) -> LayerMasks:
        """How the decoder takes its attention masks: one for every layer, or one per layer type with the
        sliding-window layers' limited to their window."""
        return LayerMasks.of(self.config)

    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one cached token takes over all decoder layers."""
        return kv_bytes_per_token(self.config, self.dtype)

    def new_cache(self, num_slots: int, capacity: int) -> SlotCache:
        return SlotCache(self.config.num_hidden_layers, num_slots, capacity, self.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float() if logits.dtype != torch.float64 else logits

    @torch.inference_mode()
    def embed(self, prompt: PromptInput) -> PromptEmbeds:
        """The prompt's input embeddings, the vision tower and projector run on its images (once)."""
        ids = torch.tensor([prompt.token_ids], dtype=torch.long, device=self.device)  # long even when empty
        embeds = self.embed_tokens(ids)
        image_mask = torch.zeros_like(ids, dtype=torch.bool)
        images = image_tensors(prompt.images, self.device, self.dtype)
        deepstack = None
        if images:
            visual = self.adapter.embed_images(images)
            image_mask = ids == self.adapter.image_token_id
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), visual.features.to(embeds.dtype))
            deepstack = visual.deepstack
        blocks = self.adapter.bidirectional_blocks(ids) if images else None
        return PromptEmbeds(embeds, image_mask, self.adapter.rope_index(ids, images), blocks, deepstack,
                            self.layer_masks)

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, cache: SlotCache, slot: int, offset: int,
                inputs: dict | None = None) -> torch.Tensor:
        """Run prompt embeddings [1, n, H] into `slot` after its `offset` cached tokens (a whole prompt,
        or one chunk of it); returns the last hidden states [1, n, H]. `inputs`: the chunk's other
        decoder inputs (`PromptEmbeds.chunk_inputs`); without them the decoder's own causal mask (one
        row, no padding) and positions (the cache indices) fit."""
        cache.bind([slot], [offset], embeds.shape[1])
        return self.adapter.decoder(inputs_embeds=embeds, cache=cache, use_cache=True,
                                    **(inputs or {})).last_hidden_state

    @torch.inference_mode()
    def verify(self, tree: DraftTree, cache: SlotCache, slots: list[int], prefix_lens: list[int],
               rope_deltas: list[int] | None = None) -> ForwardOutput:
        """Score every node of a batch of trees (row b: slot `slots[b]` after `prefix_lens[b]` cached
        tokens) in one forward; each row's tree KV rows land right after its own prefix. A node's
        position is its row's prefix length + `rope_deltas[b]` (M-RoPE after images, else 0) + its
        depth; an M-RoPE decoder puts a 1-row position on all three of its rows. Where the target
        `packs`, the padding nodes of trees of different sizes are left out of the forward, and the
        outputs at their places are copies of a real node's (acceptance never reads them)."""
        packing = (tree.packing(tree.num_nodes <= self.one_call_nodes) if self.packs and tree.batch_size > 1
                   else None)
        offsets = cache.bind(slots, prefix_lens, tree.num_nodes, None if packing is None else packing.index)
        positions = offsets if rope_deltas is None else offsets + torch.tensor(rope_deltas, device=offsets.device)
        tokens, position_ids = tree.tokens.clamp(min=0), tree.position_ids(positions)  # padding runs as token 0
        extra = {}
        if packing is not None:
            tokens, position_ids = tokens.flatten()[packing.index][None], position_ids.flatten()[packing.index][None]
            extra["packed_rows"] = tuple(zip(packing.counts, prefix_lens))
        out = self.adapter.decoder(
            input_ids=tokens,
            attention_mask=self.layer_masks(
                lambda window: tree.attention_mask(offsets, self.dtype, cache.binding.width, window)),
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **extra,
        )
        hidden = out.last_hidden_state
        logits = self.logits(hidden)
        if packing is not None:  # back to [B, N, ...]: a padding node's place gets the first real node's
            places = torch.zeros(tree.tokens.numel(), dtype=torch.long, device=tokens.device)
            places[packing.index] = torch.arange(len(packing.index), device=tokens.device)
            logits, hidden = (t[0].index_select(0, places).view(*tree.tokens.shape, -1) for t in (logits, hidden))
        return ForwardOutput(logits, hidden)
