"""tiny-vlm's quality on easy-vqa's test split: `python -m specserve.server.training.tiny_vlm.evaluate`.

Two numbers, both from greedy decoding of the assembled model, loaded the way a user loads it:
- QA exact match: the generated text, stripped and lowercased, equals the easy-vqa answer;
- description accuracy: "Describe the image." yields text naming the image's shape and colour and
  no other easy-vqa shape or colour.
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from ...store.tiny_vlm.assemble import assemble
from .data import COLORS, SHAPES, ImageRecord, load_split
from .texts import DESCRIBE_PROMPTS, Sample, qa_samples

_WORD = re.compile(r"[a-z]+")


def generate(model, processor, records: list[ImageRecord], samples: list[Sample],
             max_new_tokens: int, batch: int) -> list[list[int]]:
    """Greedy completions (token ids, prompt excluded, up to `<|im_end|>`) of each sample's turn."""
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    outputs: list[list[int]] = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.prompt}]}],
                add_generation_prompt=True,
            )
            for s in chunk
        ]
        images = [Image.open(records[s.image].path).convert("RGB") for s in chunk]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        eos = model.generation_config.eos_token_id
        for row in ids[:, inputs["input_ids"].shape[1] :].tolist():
            outputs.append(row[: row.index(eos)] if eos in row else row)
    return outputs


def names_right(text: str, record: ImageRecord) -> bool:
    """True if `text` names the record's shape and colour and no other shape or colour."""
    words = set(_WORD.findall(text.lower()))
    return words & set(SHAPES) == {record.shape} and words & set(COLORS) == {record.color}


def evaluate(model_dir: Path, questions: int, descriptions: int, batch: int, seed: int) -> dict[str, float]:
    """Run both measurements on `questions` test questions and `descriptions` test images (0 = all)."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    records = load_split("test")
    qa = qa_samples(records)
    if questions:
        qa = random.Random(seed).sample(qa, questions)
    started = time.perf_counter()
    answers = generate(model, processor, records, qa, max_new_tokens=4, batch=batch)
    texts = [processor.tokenizer.decode(a, skip_special_tokens=True).strip().lower() for a in answers]
    hits = [t == s.target for t, s in zip(texts, qa)]
    kinds = {"yes/no": ("yes", "no"), "shape": SHAPES, "colour": COLORS}
    report = {"qa_exact_match": sum(hits) / len(hits), "qa_count": len(hits)}
    for kind, words in kinds.items():
        kind_hits = [h for h, s in zip(hits, qa) if s.target in words]
        report[f"qa_{kind}"] = sum(kind_hits) / max(1, len(kind_hits))
    images = list(range(len(records)))[: descriptions or len(records)]
    prompts = [Sample(i, DESCRIBE_PROMPTS[0], "", "describe") for i in images]
    described = generate(model, processor, records, prompts, max_new_tokens=160, batch=batch)
    decoded = [processor.tokenizer.decode(d, skip_special_tokens=True) for d in described]
    named = [names_right(text, records[i]) for text, i in zip(decoded, images)]
    report["description_accuracy"] = sum(named) / len(images)
    report["description_count"] = len(images)
    report["description_mean_tokens"] = sum(map(len, described)) / len(described)
    report["image_tokens_emitted"] = sum(r.count(processor.image_token_id) for r in answers + described)
    report["seconds"] = time.perf_counter() - started
    report["example_description"] = decoded[0]
    return report


def main() -> None:
    """CLI entry point: prints one `name: value` line per measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="an assembled tiny-vlm folder")
    source.add_argument("--smollm2", type=Path, help="assemble from this SmolLM2 folder into a temp dir")
    parser.add_argument("--questions", type=int, default=0, help="seeded sample of test questions (0 = all)")
    parser.add_argument("--descriptions", type=int, default=0, help="first N test images (0 = all)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(tmp)
            assemble(model_dir, args.smollm2)
        report = evaluate(model_dir, args.questions, args.descriptions, args.batch, args.seed)
    for name, value in report.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
    main()
