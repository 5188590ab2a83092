"""Self-distillation data: the target's own greedy answers to the training prompts.

Only token ids are kept (in memory, and in a small JSON file so a resumed run does not regenerate
them); teacher features and logits are recomputed at every training step (online distillation).
Answers are generated with the target's `generate` in left-padded batches: batching is what makes
this affordable on a CPU, and tiny padding-induced differences from unbatched decoding do not matter
for training data (they are still the target's own outputs).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ...engine.outputs import PromptInput, image_tensors
from .prompts import PromptSpec


@dataclass(frozen=True, eq=False)
class Example:
    """A prompt and the target's answer to it, as the target sees them."""

    spec: PromptSpec
    token_ids: list[int]  # prompt (image placeholders expanded) + answer
    answer_start: int
    images: dict[str, torch.Tensor] | None  # the prompt's `PromptInput.images`


def batch_images(examples) -> dict[str, torch.Tensor]:
    """The images of several prompts (`Example`s or `PromptInput`s) as one batch: each tensor joined
    along its image axis, as for families whose processor gives every image the same shape (LLaVA);
    {} without images."""
    with_images = [e.images for e in examples if e.images]
    return {key: torch.cat([images[key] for images in with_images]) for key in (with_images or [{}])[0]}


def chat_prompt(engine, spec: PromptSpec) -> PromptInput:
    """The prompt of one user turn through the target's chat template (and image processor)."""
    content = [{"type": "text", "text": spec.text}]
    if spec.image is not None:
        content.insert(0, {"type": "image", "image": Image.open(spec.image).convert("RGB")})
    return engine.prepare_chat([{"role": "user", "content": content}])


def generate_examples(
    engine, specs: list[PromptSpec], max_new_tokens: int, batch_size: int, desc: str
) -> list[Example]:
    """Greedy answers of the target to `specs`, in batches; an answer ends at EOS (kept) or the limit."""
    examples: list[Example] = []
    for start in tqdm(range(0, len(specs), batch_size), desc=desc, unit="batch"):
        batch = [chat_prompt(engine, spec) for spec in specs[start : start + batch_size]]
        answers = _generate_batch(engine, batch, max_new_tokens)
        for spec, prompt, answer in zip(specs[start : start + batch_size], batch, answers):
            examples.append(Example(spec, prompt.token_ids + answer, len(prompt.token_ids), prompt.images))
    return examples


@torch.inference_mode()
def _generate_batch(engine, prompts: list[PromptInput], max_new_tokens: int) -> list[list[int]]:
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    width = max(len(p.token_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=engine.target.device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt.token_ids):] = torch.tensor(prompt.token_ids, device=ids.device)
        mask[row, width - len(prompt.token_ids):] = 1
    extra = image_tensors(batch_images(prompts), engine.target.device, engine.target.dtype)
    model = engine.target.model
    if extra:  # M-RoPE families compute the prompt's positions from them (`adapter.token_types`)
        extra |= engine.target.adapter.token_types(ids)
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
        pad_token_id=pad, **extra,
    )
    answers = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in engine.eos_token_ids), len(row))
        answers.append(row[:end])
    return answers


def save_examples(examples: list[Example], path: Path) -> None:
    rows = [{"text": e.spec.text, "image": e.spec.image, "answer": e.token_ids[e.answer_start:]} for e in examples]
    Path(path).write_text(json.dumps(rows))


def load_examples(engine, path: Path) -> list[Example]:
    """Examples saved by `save_examples`; prompts are re-templated, answers taken as saved."""
    examples = []
    for row in json.loads(Path(path).read_text()):
        spec = PromptSpec(row["text"], row["image"])
        prompt = chat_prompt(engine, spec)
        examples.append(Example(spec, prompt.token_ids + row["answer"], len(prompt.token_ids), prompt.images))
    return examples


def cached_examples(
    engine, specs: list[PromptSpec], path: Path, max_new_tokens: int, batch_size: int, desc: str
) -> list[Example]:
    """`generate_examples`, reusing `path` if an earlier run (e.g. an interrupted one) wrote it."""
    if Path(path).is_file():
        return load_examples(engine, path)
    examples = generate_examples(engine, specs, max_new_tokens, batch_size, desc)
    save_examples(examples, path)
    return examples


def draft_vocabulary(examples: list[Example], size: int) -> torch.Tensor:
    """The `size` most frequent answer tokens of `examples`, as sorted token ids [K] (K <= size).

    The head drafts from these rows of the LM head only (see `eagle.VocabProjection`); ties are
    broken by token id, so the vocabulary is a deterministic function of the data."""
    counts = Counter(t for e in examples for t in e.token_ids[e.answer_start:])
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:size]
    return torch.tensor(sorted(ranked), dtype=torch.long)
