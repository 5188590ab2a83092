"""tiny-vlm's training recipe: `python -m specserve.server.training.tiny_vlm.train --smollm2 DIR`.

Stage 1 trains the CLIP vision tower from scratch as a classifier (shape, colour, size, place) on the
mean of its patch tokens, the features the projector will read. Stage 2 trains the projector, a LoRA
on SmolLM2 and (at a lower rate) the tower with the LM loss on answer tokens only: easy-vqa
questions, captions and descriptions. The assets (bf16) go to `assets/tiny-vlm/`. Seeded; the
commands that made the committed assets are in their MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import CLIPVisionModel, LlavaProcessor

from ...store.tiny_vlm.assemble import ASSETS, LORA_FILE, VISION_FILE, VISION_PREFIXES
from ...store.tiny_vlm.lora import add_lora, export_factors, load_factors
from ...store.tiny_vlm.model import (
    IMAGE_TOKEN,
    NUM_IMAGE_TOKENS,
    build_model,
    build_processor,
    vision_config,
)
from .data import COLORS, NUM_PLACES, SHAPES, SIZES, ImageRecord, load_split
from .texts import Sample, qa_samples, random_sample


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of both stages (the model card gives the flags of each command behind the
    committed assets)."""

    seed: int = 0
    stage1_epochs: int = 20
    stage1_batch: int = 64
    stage1_lr: float = 2e-3
    stage2_steps: int = 200
    qa_batch: int = 24
    text_batch: int = 8  # captions and descriptions are ~3x longer than answers
    stage2_lr: float = 1e-3
    stage2_vision_lr: float = 2e-4  # the tower keeps learning from the LM loss, gently
    warmup: int = 20
    lora_rank: int = 8  # 0 = frozen language model
    lora_alpha: float = 16.0
    task_weights: tuple[float, float, float] = (0.65, 0.1, 0.25)  # qa, caption, describe
    save_every: int = 25
    match_scale: bool = True  # see match_embedding_scale; command 1 in the model card had it off
    aux_weight: float = 0.0  # WordAlignment's weight; 0 = off
    match_repeat: int = 1  # see repeat_matches; 1 = easy-vqa's own mix


def pixel_values(processor: LlavaProcessor, records: list[ImageRecord]) -> torch.Tensor:
    """All images of a split through the model's own image processor: [N, 3, 64, 64]."""
    from PIL import Image

    images = [Image.open(r.path).convert("RGB") for r in records]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def _heads_targets(records: list[ImageRecord]) -> torch.Tensor:
    return torch.tensor(
        [[SHAPES.index(r.shape), COLORS.index(r.color), SIZES.index(r.size), r.place] for r in records]
    )


def _mirror(pixels: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right mirrored images: a mirrored shape keeps its kind and colour; the place column flips."""
    row, col = targets[:, 3] // 3, targets[:, 3] % 3
    mirrored = targets.clone()
    mirrored[:, 3] = row * 3 + (2 - col)
    return pixels.flip(-1), mirrored


def train_vision(pixels: torch.Tensor, records: list[ImageRecord], cfg: TrainConfig) -> CLIPVisionModel:
    """Stage 1: the vision tower learns shape, colour, size and place from its mean patch token."""
    tower = CLIPVisionModel(vision_config())
    sizes = (len(SHAPES), len(COLORS), len(SIZES), NUM_PLACES)
    heads = nn.Linear(tower.config.hidden_size, sum(sizes))
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.stage1_lr, weight_decay=0.05)
    # Mirroring doubles the 4,000 images: a ViT trained from scratch is short of data for shapes.
    pixels, targets = (torch.cat(pair) for pair in zip((pixels, _heads_targets(records)),
                                                        _mirror(pixels, _heads_targets(records))))
    steps = cfg.stage1_epochs * math.ceil(len(pixels) / cfg.stage1_batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.stage1_lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc="stage 1 (vision tower)")
    for _ in range(cfg.stage1_epochs):
        for batch in torch.randperm(len(pixels)).split(cfg.stage1_batch):
            patches = tower(pixel_values=pixels[batch]).last_hidden_state[:, 1:]
            logits = heads(patches.mean(1)).split(sizes, dim=-1)
            loss = sum(F.cross_entropy(lg, targets[batch, i]) for i, lg in enumerate(logits))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            hits = [(lg.argmax(-1) == targets[batch, i]).float().mean().item() for i, lg in enumerate(logits)]
            bar.set_postfix(loss=f"{loss.item():.3f}", shape=f"{hits[0]:.2f}", color=f"{hits[1]:.2f}")
    bar.close()
    return tower


LORA_PREFIX = "model.language_model.layers."  # LoRA factor keys, as `assemble` merges them


class Batcher:
    """Turns samples into right-padded token batches with a target mask.

    Right padding needs no attention mask: with causal attention no real token sees a pad after it.
    The prompt is tokenized alone and the answer appended, exactly as generation will see it.
    """

    def __init__(self, processor: LlavaProcessor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def prompt(self, sample: Sample) -> str:
        """The chat-template prompt with `<image>` expanded to the visual token count."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * NUM_IMAGE_TOKENS)

    def __call__(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] and is_target [B, T] (True where the token is part of the answer)."""
        prompts = self.tokenizer([self.prompt(s) for s in samples], add_special_tokens=False)["input_ids"]
        answers = self.tokenizer([s.target for s in samples], add_special_tokens=False)["input_ids"]
        rows = [(p, a + [self.end]) for p, a in zip(prompts, answers)]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        is_target = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (p, a) in enumerate(rows):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            is_target[i, len(p) : len(p) + len(a)] = True
        return ids, is_target


def answer_loss(model: nn.Module, ids: torch.Tensor, is_target: torch.Tensor,
                pixels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens; the vocabulary projection runs on those rows only."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids, pixel_values=pixels, use_cache=False).last_hidden_state
        # position t predicts token t + 1
        predicts_target = is_target[:, 1:]
        logits = model.lm_head(hidden[:, :-1][predicts_target])
    return F.cross_entropy(logits.float(), ids[:, 1:][predicts_target])


class WordAlignment:
    """Auxiliary loss that makes the image tokens *say* their shape and colour in the LM's own words.

    The LM loss alone leaves colour in small, low-variance directions of the projected tokens (a
    standardised linear probe reads it, SmolLM2 does not): the model falls back to "gray". Here the
    mean projected token of each image is scored against the (tied, frozen) word embeddings of the
    8 colour words and, separately, the 3 shape words (cosine x `temperature`), with cross-entropy
    on the image's labels. That puts the answer words' own embedding directions into the image tokens,
    which the LM copies easily.
    """

    def __init__(self, model: nn.Module, tokenizer, records: list[ImageRecord], temperature: float = 10.0) -> None:
        embed = model.get_input_embeddings().weight.detach()

        def rows(words: tuple[str, ...]) -> torch.Tensor:
            ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
            return F.normalize(torch.stack([embed[i].mean(0) for i in ids]).float(), dim=-1)

        self.colours, self.shapes = rows(COLORS), rows(SHAPES)
        self.targets = _heads_targets(records)
        self.temperature = temperature

    def scores(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour [N, 8] and shape [N, 3] logits of each image's mean projected token."""
        tower = model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        tokens = F.normalize(model.model.multi_modal_projector(tower).float().mean(1), dim=-1)
        return self.temperature * tokens @ self.colours.T, self.temperature * tokens @ self.shapes.T

    def __call__(self, model: nn.Module, pixels: torch.Tensor, images: list[int]) -> torch.Tensor:
        """The loss for `pixels`, the images at `images` in the records."""
        colour, shape = self.scores(model, pixels)
        targets = self.targets[images]
        return F.cross_entropy(colour, targets[:, 1]) + F.cross_entropy(shape, targets[:, 0])


def repeat_matches(qa: list[Sample], records: list[ImageRecord], times: int) -> list[Sample]:
    """`qa` with each yes/no question that names the image's own shape or colour repeated `times`.

    In easy-vqa most yes/no questions ask about a shape or colour the image does *not* have (82% of
    "is there not ..." questions are answered "yes"), so a model can score well on the prior alone
    and answer "no" to "is there a red shape?" about a red one. Repeating the matching cases makes
    the answer depend on comparing the asked word with the image.
    """
    def matches(sample: Sample) -> bool:
        record = records[sample.image]
        words = set(sample.prompt.rstrip("?").split())
        return sample.target in ("yes", "no") and bool(words & {record.shape, record.color})

    return [s for s in qa for _ in range(times if matches(s) else 1)]


def train_language_side(model: nn.Module, params: list[nn.Parameter], batcher: Batcher,
                        pixels: torch.Tensor, records: list[ImageRecord], cfg: TrainConfig, out: Path) -> None:
    """Stage 2: `params` (projector, LoRA) and the vision tower through SmolLM2 on a seeded mix of
    QA, captions and descriptions. The assets are written to `out` every `cfg.save_every` steps.
    """
    rng = random.Random(cfg.seed)
    qa = repeat_matches(qa_samples(records), records, cfg.match_repeat)
    rng.shuffle(qa)
    tower = list(model.model.vision_tower.parameters())
    groups = [{"params": params}, {"params": tower, "lr": cfg.stage2_vision_lr}]
    opt = torch.optim.AdamW(groups, lr=cfg.stage2_lr, weight_decay=0.0)
    # Warmup, then inverse-sqrt decay: the schedule does not depend on the step count, so the
    # checkpoint saved at step k is exactly what a run with `stage2_steps=k` produces.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / cfg.warmup, math.sqrt(cfg.warmup / (s + 1))))
    running = {"qa": 0.0, "caption": 0.0, "describe": 0.0, "aux": 0.0}
    align = WordAlignment(model, batcher.tokenizer, records) if cfg.aux_weight else None
    bar = tqdm(range(cfg.stage2_steps), desc="stage 2 (projector + LoRA)")
    for step in bar:
        task = rng.choices(["qa", "caption", "describe"], weights=cfg.task_weights)[0]
        if task == "qa":
            start = step * cfg.qa_batch % len(qa)
            batch = qa[start : start + cfg.qa_batch]
        else:
            batch = [random_sample(records, task, rng) for _ in range(cfg.text_batch)]
        ids, is_target = batcher(batch)
        images = [s.image for s in batch]
        loss = answer_loss(model, ids, is_target, pixels[images])
        logged = {task: loss.item()}
        if align is not None:
            aux = align(model, pixels[images], images)
            logged["aux"] = aux.item()
            loss = loss + cfg.aux_weight * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        for key, value in logged.items():  # running averages for the progress bar
            running[key] = 0.9 * running[key] + 0.1 * value if running[key] else value
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.stage2_steps:
            save_assets(model, out)
            tqdm.write(f"saved assets after step {step + 1}")


def save_assets(model: nn.Module, out: Path) -> None:
    """The trained parts in bf16: vision tower + projector, and the LoRA factors (if any)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(VISION_PREFIXES)}
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, out / VISION_FILE)
    factors = export_factors(model.model.language_model.layers, LORA_PREFIX)
    if factors:
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in factors.items()}, out / LORA_FILE)


@torch.no_grad()
def match_embedding_scale(model: nn.Module, pixels: torch.Tensor) -> None:
    """Rescale the projector's output layer so image tokens start at the norm of SmolLM2's embeddings.

    A fresh projector over unnormalised ViT features emits tokens ~30x longer than word embeddings;
    the residual stream of those positions then barely changes through the layers and the LM reads
    the image poorly (colours, in particular, were not learnt).
    """
    projector = model.model.multi_modal_projector
    tokens = projector(model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:])
    words = model.get_input_embeddings().weight
    factor = words.norm(dim=-1).mean() / tokens.norm(dim=-1).mean()
    projector.linear_2.weight.mul_(factor)
    projector.linear_2.bias.mul_(factor)


def train(smollm2_dir: Path, out: Path, cfg: TrainConfig, vision_from: Path | None = None,
          resume_from: Path | None = None) -> None:
    """Run both stages with `cfg.seed` into `out`. With `vision_from`, stage 1 is skipped and stage 2
    starts from the vision tower in those assets (fresh projector and LoRA); with `resume_from`, stage
    2 continues from all the assets there (tower, projector, LoRA; the optimizer starts afresh)."""
    torch.manual_seed(cfg.seed)
    processor = build_processor(smollm2_dir)
    records = load_split("train")
    pixels = pixel_values(processor, records)
    start = vision_from or resume_from
    # Stage 1 runs before the model is built, so each path draws the same random numbers as the
    # commands in the model card did.
    tower = train_vision(pixels, records, cfg) if start is None else None
    model = build_model(smollm2_dir, processor.image_token_id)
    if tower is not None:
        model.model.vision_tower.load_state_dict(tower.state_dict())
    else:
        keep = VISION_PREFIXES if resume_from else ("model.vision_tower.",)
        saved = load_file(start / VISION_FILE)
        model.load_state_dict({k: v.float() for k, v in saved.items() if k.startswith(keep)}, strict=False)
    if cfg.match_scale and resume_from is None:
        match_embedding_scale(model, pixels[:256])
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    model.model.vision_tower.requires_grad_(True)
    params = list(model.model.multi_modal_projector.parameters())
    if cfg.lora_rank:
        layers = model.model.language_model.layers
        params += add_lora(layers, cfg.lora_rank, cfg.lora_alpha)
        if resume_from:
            load_factors(layers, load_file(resume_from / LORA_FILE), LORA_PREFIX)
    train_language_side(model, params, Batcher(processor), pixels, records, cfg, out)


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", type=Path, required=True, help="SmolLM2-135M-Instruct HF folder")
    parser.add_argument("--out", type=Path, default=ASSETS, help="where the assets go")
    parser.add_argument("--threads", type=int, default=2)
    defaults = TrainConfig()
    parser.add_argument("--vision-from", type=Path, help="skip stage 1; take the vision tower from these assets")
    parser.add_argument("--resume-from", type=Path, help="skip stage 1; continue stage 2 from these assets")
    parser.add_argument("--no-match-scale", dest="match_scale", action="store_false",
                        help="keep the projector's default init (the first pass of the committed run)")
    parser.add_argument("--task-weights", type=lambda s: tuple(map(float, s.split(","))),
                        default=defaults.task_weights, help="qa,caption,describe sampling weights")
    parser.add_argument("--aux-weight", type=float, default=defaults.aux_weight,
                        help="weight of the shape/colour word-alignment loss on the projected tokens")
    for name in ("seed", "stage1_epochs", "stage2_steps", "lora_rank", "match_repeat", "qa_batch"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(seed=args.seed, stage1_epochs=args.stage1_epochs, stage2_steps=args.stage2_steps,
                      lora_rank=args.lora_rank, task_weights=args.task_weights,
                      match_scale=args.match_scale, aux_weight=args.aux_weight,
                      match_repeat=args.match_repeat, qa_batch=args.qa_batch)
    train(args.smollm2, args.out, cfg, args.vision_from, args.resume_from)


if __name__ == "__main__":
    main()
