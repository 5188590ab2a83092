"""The training run: self-distillation data, two stages, checkpoints, held-out evaluation.

Stage 1 trains on text prompts only; stage 2 mixes in image prompts with a share rising linearly
from `image_share_start` to 1 (MSD ramps the image share to 1 over the second half of training).
Every batch is drawn from an RNG seeded by (seed, step), so a resumed run continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ....drafting.eagle_head import HeadConfig, ImageMode, new_head, save_head
from .data import Example, cached_examples, draft_vocabulary
from .distill import distill_loss, draft_batch, teacher_pass, top1_accuracy
from .prompts import image_prompts, sample_prompts, text_prompts

CHECKPOINT = "checkpoint.pt"
# Stage 1 sees no image, so it is the same for every image mode: copied into another run folder as
# its `checkpoint.pt`, it lets that run train stage 2 only, in another mode, with the same budget.
STAGE1_CHECKPOINT = "stage1.pt"


@dataclass(frozen=True)
class TrainConfig:
    """One training run (the defaults are the committed tiny-vlm run)."""

    model: str
    out: str
    image_mode: ImageMode = ImageMode.DECOUPLED
    pool_stride: int = 2
    seed: int = 0
    dtype: str = "bfloat16"  # the teacher's dtype: the drafter learns the features it will be served
    text_examples: int = 240
    image_examples: int = 640
    eval_text: int = 20
    eval_images: int = 40
    max_new_tokens: int = 160
    gen_batch: int = 16
    batch_size: int = 8
    text_steps: int = 150
    mm_steps: int = 450
    image_share_start: float = 0.25
    lr: float = 5e-4
    warmup: int = 30
    feature_noise: float = 0.1
    ce_weight: float = 0.1
    passes: int = 3  # tree depths unrolled in training (1 = EAGLE-1's teacher forcing only)
    draft_vocab: int = 8192  # most frequent answer tokens the head drafts from; 0 = the whole vocabulary
    checkpoint_every: int = 50
    # Stop after this step of the schedule (0 = at the end): the schedule stays that of the whole
    # run, so stopping at N gives exactly the first N steps of it (equal budgets for comparisons).
    stop_at: int = 0
    cache_dir: str | None = None

    @property
    def total_steps(self) -> int:
        return self.text_steps + self.mm_steps

    def image_share(self, step: int) -> float:
        if step < self.text_steps:
            return 0.0
        progress = (step - self.text_steps) / max(self.mm_steps - 1, 1)
        return self.image_share_start + (1.0 - self.image_share_start) * progress

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.total_steps - self.warmup, 1)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class Datasets:
    train_text: list[Example]
    train_images: list[Example]
    eval_text: list[Example]
    eval_images: list[Example]


def build_datasets(engine, config: TrainConfig, out: Path) -> Datasets:
    """The target's greedy answers to the training and held-out prompts (cached under `out`)."""
    def make(name: str, specs) -> list[Example]:
        return cached_examples(engine, specs, out / f"data-{name}.json", config.max_new_tokens,
                               config.gen_batch, f"generating {name}")

    seed = config.seed
    images = engine.is_multimodal
    return Datasets(
        make("train-text", sample_prompts(text_prompts(False), config.text_examples, seed)),
        make("train-images", image_prompts(False, config.image_examples, seed) if images else []),
        make("eval-text", sample_prompts(text_prompts(True), config.eval_text, seed)),
        make("eval-images", image_prompts(True, config.eval_images, seed) if images else []),
    )


def pick_batch(data: Datasets, config: TrainConfig, step: int) -> list[Example]:
    rng = random.Random(config.seed * 1_000_003 + step)
    share = config.image_share(step) if data.train_images else 0.0
    return [rng.choice(data.train_images if rng.random() < share else data.train_text)
            for _ in range(config.batch_size)]


def train(engine, config: TrainConfig) -> dict:
    """Train (or resume) a head into `config.out`; returns the evaluation summary it also writes."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    target = engine.target
    target.model.requires_grad_(False)
    data = build_datasets(engine, config, out)
    head = new_head(target.config, HeadConfig(config.image_mode, config.pool_stride), config.seed)
    if config.draft_vocab:
        head.draft_vocab = draft_vocabulary(data.train_text + data.train_images, config.draft_vocab)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=0.0)
    step = _resume(out / CHECKPOINT, head, optimizer)
    weight = target.lm_head.weight.detach()
    weight = weight if head.draft_vocab is None else weight[head.draft_vocab]
    started = time.monotonic()
    end = config.stop_at or config.total_steps
    bar = tqdm(range(step, end), initial=step, total=end, desc="train-draft")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate(step)
        examples = pick_batch(data, config, step)
        noise = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        batch = draft_batch(head, target.embed_tokens, teacher_pass(target, examples), examples,
                            config.feature_noise, noise)
        parts = distill_loss(head, batch, weight, target.softcap, config.ce_weight, config.passes)
        optimizer.zero_grad()
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(feat=f"{parts.feature:.3f}", ce=f"{parts.cross_entropy:.2f}",
                        top1="/".join(f"{c / max(parts.count, 1):.2f}" for c in parts.correct),
                        img=f"{config.image_share(step):.2f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 in (config.text_steps, end):
            _save_checkpoint(out / CHECKPOINT, head, optimizer, step + 1)
        if step + 1 == config.text_steps:
            _save_checkpoint(out / STAGE1_CHECKPOINT, head, optimizer, step + 1)
    summary = evaluate(head, target, data, config)
    summary["train_seconds_this_run"] = round(time.monotonic() - started, 1)
    save_head(head, out / "head")
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate(head, target, data: Datasets, config: TrainConfig) -> dict:
    """Held-out top-1 accuracy on text and image prompts, per tree depth 1..passes."""
    head.eval()
    summary = {"config": {k: (v.value if isinstance(v, ImageMode) else v) for k, v in asdict(config).items()}}
    for name, examples in (("text", data.eval_text), ("images", data.eval_images)):
        if examples:
            accuracy = top1_accuracy(head, target, examples, config.batch_size, config.passes)
            summary[f"heldout_top1_{name}"] = [round(a, 4) for a in accuracy]  # per tree depth
    head.train()
    return summary


def _resume(path: Path, head, optimizer) -> int:
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _save_checkpoint(path: Path, head, optimizer, step: int) -> None:
    # write then rename: an interrupted save never leaves a truncated checkpoint behind
    tmp = path.with_suffix(".tmp")
    torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
    tmp.replace(path)
