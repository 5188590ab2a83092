"""The EAGLE/MSD draft head: one decoder layer of the target's own family behind an `fc` (2H -> H).

The head owns only `fc` and `layers.0` (plus the rotary embedding, which has no weights); it shares
the target's token embeddings and LM head, which the caller passes in where needed, so they are
never duplicated in memory nor saved with the head.

Checkpoints use the layout EAGLE-1 and MSD publish: a folder with `config.json` (the base model's
config with one hidden layer) and `model.safetensors` or `pytorch_model.bin` holding `fc.*` and
`layers.0.*`. EAGLE-1/MSD drop layer 0's `input_layernorm` for LLaMA-family bases and sometimes ship
`embed_tokens.weight`; both are handled here. MSD's Qwen2-VL heads keep the input norm and come with a
flat Qwen2-VL config (`model_type` "qwen2_vl", an "mrope" `rope_scaling`, the vision tower's settings);
only the layer sizes (`LAYER_FIELDS`) are read from any config. specserve's own heads add a
`specserve_draft` section to `config.json` with the image mode; a checkpoint without it is taken to
be an MSD head (visual tokens decoupled).
"""

from __future__ import annotations

import copy
import enum
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel, PretrainedConfig

from ..kernels.tree import FULL

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
SETTINGS_KEY = "specserve_draft"
# Sizes a checkpoint may set for its layer; everything else (rope, attention kind) is the target's.
LAYER_FIELDS = (
    "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "hidden_act", "attention_bias", "mlp_bias",
)
# Keys published checkpoints carry that the head does not own: the shared embedding / LM head, and
# rotary inverse frequencies that old transformers versions saved as buffers.
IGNORED_PREFIXES = ("embed_tokens.", "lm_head.")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ImageMode(enum.Enum):
    """What the drafter consumes at image placeholder positions of the prompt."""

    TEXT_ONLY = "text_only"  # the placeholder token's embedding, fused with h like text: a text drafter
    FUSED = "fused"  # the target's merged visual embedding, fused with h through fc (vLLM's VLM EAGLE)
    DECOUPLED = "decoupled"  # MSD: the visual embedding itself, bypassing fc; h at images unused
    DECOUPLED_POOLED = "decoupled_pooled"  # decoupled, visual tokens average-pooled for the drafter


@dataclass(frozen=True)
class HeadConfig:
    """The head's own settings (its layer's sizes come from the target's text config)."""

    image_mode: ImageMode = ImageMode.DECOUPLED
    pool_stride: int = 2  # DECOUPLED_POOLED: a square grid pools stride x stride patches into one
    input_norm: bool = True  # False for EAGLE-1/MSD checkpoints, whose layer 0 has no input norm
    fc_bias: bool = True  # EAGLE-1 and MSD use a biased fc

    def __post_init__(self) -> None:
        if self.pool_stride < 1:
            raise ValueError(f"pool_stride must be >= 1, got {self.pool_stride}")


class EagleHead(nn.Module):
    """fc + one decoder layer. `forward` maps drafter inputs to predicted target features.

    There is no final norm: the features it predicts are the target's final-norm hidden states, which
    the target's LM head reads directly (as in EAGLE-1)."""

    def __init__(self, layer_config: PretrainedConfig, settings: HeadConfig) -> None:
        super().__init__()
        layer_cls, rotary_cls = family_classes(layer_config)
        hidden = layer_config.hidden_size
        self.settings = settings
        self.layer_config = layer_config
        self.fc = nn.Linear(2 * hidden, hidden, bias=settings.fc_bias)
        self.layers = nn.ModuleList([layer_cls(layer_config, layer_idx=0)])
        if not settings.input_norm:
            self.layers[0].input_layernorm = nn.Identity()
        self.rotary_emb = rotary_cls(config=layer_config)
        # a family with a rotary table per layer type (Gemma 3: local and global bases) takes the layer's type
        self.rotary_kwargs = {}
        if "layer_type" in inspect.signature(rotary_cls.forward).parameters:
            self.rotary_kwargs["layer_type"] = layer_config.layer_types[0]
        # Optional draft vocabulary [K] (token ids, sorted): drafted tokens come from these rows of the
        # target's LM head only, which cuts the costliest matmul of a tree level on a CPU (EAGLE-3's
        # d2t idea). None = the whole vocabulary. A buffer, so it travels with the checkpoint.
        self.register_buffer("draft_vocab", None)

    def fuse(self, token_embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """fc(concat(embedding of token t+1, feature at t)): [..., H] x [..., H] -> [..., H]."""
        return self.fc(torch.cat([token_embeds, hidden], dim=-1))

    def forward(
        self,
        inputs: torch.Tensor,  # [B, n, H] drafter inputs (fused text entries, raw visual entries)
        position_ids: torch.Tensor,  # [B, n] drafter positions
        attention_mask: torch.Tensor,  # [B, 1, n, cached + n] additive
        cache=None,  # a transformers Cache holding the drafter's earlier entries, or None (training)
    ) -> torch.Tensor:
        """Predicted target features [B, n, H]; with a cache, the entries' KV rows are appended."""
        position_embeddings = self.rotary_emb(inputs, position_ids, **self.rotary_kwargs)
        return self.layers[0](
            inputs, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=cache is not None, position_embeddings=position_embeddings,
        )


def family_classes(layer_config: PretrainedConfig) -> tuple[type[nn.Module], type[nn.Module]]:
    """The decoder layer and rotary embedding classes of the config's model family.

    Built through `AutoModel` on the meta device (no memory, no init), so every family transformers
    knows works without naming any of them here."""
    with torch.device("meta"):
        model = AutoModel.from_config(layer_config)
    return type(model.layers[0]), type(model.rotary_emb)


def layer_config_for(text_config: PretrainedConfig, overrides: dict | None = None) -> PretrainedConfig:
    """The target's text config cut to one layer, with a checkpoint's layer sizes applied.

    A family with `layer_types` (sliding-window and full layers: Gemma 2/3, Qwen2) gets one full
    attention layer: the drafter's masks cover all its entries, so the layer must not window them
    itself (as some attention kernels would for a sliding layer)."""
    overrides = overrides or {}
    hidden = overrides.get("hidden_size", text_config.hidden_size)
    if hidden != text_config.hidden_size:
        raise ValueError(f"the draft head has hidden size {hidden}, the target {text_config.hidden_size}")
    config = copy.deepcopy(text_config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = [FULL]
    for name in LAYER_FIELDS:
        if name in overrides:
            setattr(config, name, overrides[name])
    return config


def new_head(text_config: PretrainedConfig, settings: HeadConfig, seed: int = 0) -> EagleHead:
    """A randomly initialised head for a target with `text_config` (float32, CPU).

    Seeds a forked RNG, so the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EagleHead(layer_config_for(text_config), settings)


def save_head(head: EagleHead, folder: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write `config.json` + `model.safetensors` (EAGLE key layout) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {name: getattr(head.layer_config, name) for name in ("model_type", "hidden_size", *LAYER_FIELDS)
              if hasattr(head.layer_config, name)}
    config["num_hidden_layers"] = 1
    config[SETTINGS_KEY] = {
        "image_mode": head.settings.image_mode.value, "pool_stride": head.settings.pool_stride,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous()
             for k, v in head.state_dict().items()}
    save_file(state, str(folder / SAFETENSORS_FILE), metadata={"format": "pt"})


def is_eagle_folder(path: str | Path) -> bool:
    """True if `path` is a folder holding an EAGLE-1/MSD-layout head (judged by its weight keys)."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        return False
    keys = _weight_keys(folder)
    return "fc.weight" in keys and any(key.startswith("layers.0.") for key in keys)


def load_head(
    folder: str | Path, text_config: PretrainedConfig, dtype: torch.dtype, device: str | torch.device
) -> EagleHead:
    """Load a head folder for a target with `text_config`; raises ValueError on a layout mismatch."""
    folder = Path(folder)
    raw = json.loads((folder / CONFIG_FILE).read_text())
    state = _read_weights(folder)
    own = raw.get(SETTINGS_KEY, {})
    settings = HeadConfig(
        image_mode=ImageMode(own.get("image_mode", ImageMode.DECOUPLED.value)),
        pool_stride=int(own.get("pool_stride", HeadConfig.pool_stride)),
        input_norm="layers.0.input_layernorm.weight" in state,
        fc_bias="fc.bias" in state,
    )
    head = EagleHead(layer_config_for(text_config, raw), settings)
    head.draft_vocab = state.get("draft_vocab")  # set first, so load_state_dict expects the key
    kept = {k: v for k, v in state.items()
            if not k.startswith(IGNORED_PREFIXES) and not k.endswith(IGNORED_SUFFIXES)}
    missing, unexpected = head.load_state_dict(kept, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder} is not a loadable EAGLE head: missing {missing}, unexpected {unexpected}")
    return head.to(device=device, dtype=dtype).eval()


def _weight_keys(folder: Path) -> set[str]:
    if (folder / SAFETENSORS_FILE).is_file():
        with safe_open(str(folder / SAFETENSORS_FILE), framework="pt") as f:
            return set(f.keys())
    if (folder / TORCH_FILE).is_file():
        return set(_read_weights(folder))
    return set()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / SAFETENSORS_FILE).is_file():
        with safe_open(str(folder / SAFETENSORS_FILE), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    if (folder / TORCH_FILE).is_file():
        # mmap + weights_only: a downloaded pickle may hold only tensors, and large ones stay on disk
        return torch.load(folder / TORCH_FILE, map_location="cpu", mmap=True, weights_only=True)
    raise FileNotFoundError(f"{folder} has neither {SAFETENSORS_FILE} nor {TORCH_FILE}")
