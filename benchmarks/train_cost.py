"""What one stage-2 training step of a tiny-vlm-style model costs with a given language model, side by
side: the estimate behind training `tiny-qwen-vl` (issue #20) on this CPU.

tiny-vlm's stage 2 (`server/training/tiny_vlm/train.py`) trains a LoRA (rank 8, every linear layer of
the decoder) with bf16 autocast on a batch of 24 question-answer rows and 8 caption / description
rows, each with 64 image tokens in front. Its vision tower and projector are small next to the
language model, so the step's cost is the LM's forward + backward over that batch. This times that
part for each model: random token ids (the cost does not depend on the values), the same shapes,
`--steps` steps after one warm-up, median seconds per step.

    python benchmarks/train_cost.py --models smollm2-135m qwen2.5-coder-0.5b --threads 1

Writes train-cost.{md,json} into `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from specserve.server.store.resolve import resolve_model
from specserve.server.store.tiny_vlm.lora import add_lora

IMAGE_TOKENS = 64  # tiny-vlm's image tokens per row
# (rows, prompt tokens after the image, answer tokens): easy-vqa questions with one-word answers, and
# captions / descriptions about 3x longer; the loss (and the vocabulary projection) covers answers only
BATCHES = ((24, 22, 2), (8, 12, 60))


def step_seconds(model: torch.nn.Module, params: list[torch.nn.Parameter], steps: int) -> list[float]:
    """Seconds of each of `steps` training steps (forward, loss on the answer tokens, backward, AdamW)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    times = []
    for step in range(steps + 1):  # the first one warms up
        start = time.perf_counter()
        for rows, prompt, answer in BATCHES:
            ids = torch.randint(0, vocab, (rows, IMAGE_TOKENS + prompt + answer))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                logits = model.lm_head(hidden[:, -answer - 1 : -1])  # position t predicts token t + 1
            F.cross_entropy(logits.float().flatten(0, 1), ids[:, -answer:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32).train()
        model.requires_grad_(False)
        params = add_lora(model.model, rank=8, alpha=16.0)
        times = step_seconds(model, params, args.steps)
        rows.append({"model": name, "parameters": sum(p.numel() for p in model.parameters()),
                     "lora_parameters": sum(p.numel() for p in params), "seconds": times,
                     "median_seconds": statistics.median(times)})
        del model
    base = rows[0]["median_seconds"]
    command = "python benchmarks/train_cost.py --models " + " ".join(args.models) + \
        f" --steps {args.steps} --threads {args.threads}"
    lines = [
        "# Training cost: one tiny-vlm stage-2 step's language-model part, by language model", "",
        f"Command: `{command}`  ",
        "LoRA rank 8 on every decoder linear layer, bf16 autocast; per step, rows of (image + prompt + answer) "
        "tokens: " + ", ".join(f"{rows} x ({IMAGE_TOKENS} + {prompt} + {answer})" for rows, prompt, answer in BATCHES)
        + f", loss on the answers; forward + backward + AdamW; {args.steps} steps after a warm-up, "
        f"{args.threads} torch threads.", "",
        "| language model | parameters | LoRA parameters | s/step min | median | max | vs first |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['parameters']:,} | {row['lora_parameters']:,} | "
                     f"{min(row['seconds']):.1f} | {row['median_seconds']:.1f} | {max(row['seconds']):.1f} | "
                     f"{row['median_seconds'] / base:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train-cost.md").write_text("\n".join(lines) + "\n")
    (args.out / "train-cost.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
