"""Structured output benchmark: the 50 extraction tasks of `extraction.py` (JSON schema per task),
greedy, batch 1, through specserve's engine in one process, with and without speculation and with and
without grammar drafts (the tokens the grammar forces, drafted for free).

    python benchmarks/structured.py --model smollm2-135m --threads 1

Methods (all constrained by the task's schema, same target, same prompts):
- `constrained`: no drafting (`speculative: false`): plain constrained decoding, one token per forward;
- `grammar`: no drafter, grammar drafts only;
- `<draft>-no-grammar-drafts`: the drafter's trees, pruned and masked by the grammar, no grammar drafts;
- `<draft>`: the drafter's trees plus grammar drafts (the server's default).
Throughput = answer tokens / wall time over the whole set (prefill included), tasks interleaved
across methods. Every answer is checked against its schema (`jsonschema`) and against the
`constrained` answer token for token (the engine is lossless: they must be equal). A second table
asks whether a structured request slows the unconstrained ones it shares a batch with.
Writes `<name>.md` and `.json` into `--out`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from extraction import Task, check, tasks

from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig, ResponseFormat, SamplingParams
from specserve.server.engine.metrics import SpecMetrics

RESULTS = Path(__file__).parent / "results"
REFERENCE = "constrained"


@dataclass
class Method:
    name: str
    engine: Engine
    speculative: bool = True
    seconds: float = 0.0
    tokens: int = 0
    valid: int = 0
    equal: int = 0
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    outputs: list[list[int]] = field(default_factory=list)


def build(args) -> list[Method]:
    config = EngineConfig(model=args.model, draft="none", dtype=args.dtype, max_num_seqs=1,
                          max_model_len=args.max_model_len, cache_dir=args.cache_dir)
    base = Engine.from_config(config)

    def engine(draft: str, grammar_tokens: int) -> Engine:
        if draft == "none" and grammar_tokens == config.grammar_draft_tokens:
            return base
        return Engine(replace(config, draft=draft, grammar_draft_tokens=grammar_tokens), base.target, base.tokenizer)

    methods = [Method(REFERENCE, base, speculative=False), Method("grammar", base)]
    for draft in args.drafts:
        methods.append(Method(f"{draft}-no-grammar-drafts", engine(draft, 0)))
        methods.append(Method(draft, engine(draft, config.grammar_draft_tokens)))
    return methods


def measure(methods: list[Method], work: list[Task], max_tokens: int) -> None:
    for i, task in enumerate(work):
        fmt = ResponseFormat.json_schema(task.schema)
        for method in methods:
            prompt = method.engine.prepare_chat(task.messages)
            params = SamplingParams(max_tokens=max_tokens, response_format=fmt, speculative=method.speculative)
            start = time.perf_counter()
            out = method.engine.generate(prompt, params)
            method.seconds += time.perf_counter() - start
            method.tokens += len(out.token_ids)
            method.valid += out.finish_reason == "stop" and check(task, out.text)
            method.metrics.merge(out.metrics)
            method.outputs.append(out.token_ids)
        print(f"task {i + 1}/{len(work)} ({task.kind}) done", file=sys.stderr)
    reference = methods[0].outputs
    for method in methods:
        method.equal = sum(a == b for a, b in zip(method.outputs, reference))


FREE_ROWS, FREE_TOKENS = 3, 64


def mixed_batch(engine: Engine, work: list[Task], lengths: list[int], neighbour: str | None) -> float:
    """Tokens/s of FREE_ROWS unconstrained greedy requests (FREE_TOKENS each) stepped together, with a
    fourth row beside them that is `None` (absent), "free" or "structured": the extraction tasks one
    after another (so the row stays busy), asked with their schemas, or without and cut at the
    structured answer's length (`lengths`), so both neighbours prefill and emit the same amounts."""
    free = SamplingParams(max_tokens=FREE_TOKENS, ignore_eos=True)
    rows = [engine.start(engine.prepare_chat(task.messages), free) for task in work[:FREE_ROWS]]
    queue = itertools.cycle(range(FREE_ROWS, len(work)) if len(work) > FREE_ROWS else range(len(work)))

    def next_neighbour():
        i = next(queue)
        if neighbour == "structured":
            fmt = ResponseFormat.json_schema(work[i].schema)
            params = SamplingParams(max_tokens=FREE_TOKENS * 4, response_format=fmt)
        else:
            params = SamplingParams(max_tokens=lengths[i], ignore_eos=True)
        return engine.start(engine.prepare_chat(work[i].messages), params)

    extra = next_neighbour() if neighbour else None
    tokens, start = 0, time.perf_counter()
    while any(not seq.finished for seq in rows):
        live = [seq for seq in rows if not seq.finished] + ([extra] if extra is not None else [])
        for seq, out in zip(live, engine.step_batch(live)):
            if isinstance(out, Exception):
                raise out
            if out is not None and seq is not extra:
                tokens += len(out.token_ids)
        if extra is not None and extra.finished:
            engine.release(extra)
            extra = next_neighbour()
    seconds = time.perf_counter() - start
    for seq in rows + ([extra] if extra is not None else []):
        engine.release(seq)
    return tokens / seconds


def report(args, methods: list[Method], count: int) -> str:
    base = methods[0].tokens / methods[0].seconds
    lines = [
        f"# Structured output: {args.model}, {count} extraction tasks (JSON schema each), {args.dtype}, greedy, "
        "batch 1",
        "",
        f"Command: `python benchmarks/structured.py {' '.join(args.argv)}`  ",
        f"{args.threads} torch thread(s), at most {args.max_tokens} answer tokens; tok/s = answer tokens / wall "
        "time over the whole set (prefill included); mean accepted length includes the bonus token; grammar "
        "drafts = accepted draft tokens the grammar forced / all answer tokens.",
        "",
        "| method | tok/s | vs constrained | mean accepted length | grammar drafts | valid JSON for its schema "
        "| equal to constrained |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        rate = m.tokens / m.seconds
        accepted = f"{m.metrics.mean_accepted_length:.2f}" if m.metrics.verify_steps else "1.00"
        lines.append(f"| {m.name} | {rate:.1f} | {rate / base:.2f}x | {accepted} | "
                     f"{100 * m.metrics.accepted_grammar_tokens / m.tokens:.0f}% | {m.valid}/{count} | "
                     f"{m.equal}/{count} |")
    return "\n".join(lines) + "\n"


def batch_report(args, batch: dict[str, list[float]]) -> str:
    lines = ["", f"Neighbours in one batch ({args.drafts[0]} drafting): tokens/s of {FREE_ROWS} unconstrained greedy "
             f"requests ({FREE_TOKENS} tokens each) stepped together, alone or with a fourth row that runs the "
             "extraction tasks one after another: without their schemas (cut at the structured answer's length) "
             f"or with them (with and without grammar drafts); median of {args.batch_repeats} runs.", "",
             "| fourth row | free rows' tok/s | vs an unconstrained fourth row |", "|---|---|---|"]
    free = statistics.median(batch["free"])
    for name, rates in batch.items():
        lines.append(f"| {name} | {statistics.median(rates):.1f} | {statistics.median(rates) / free:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafts", nargs="+", default=["ngram", "suffix"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tasks", type=int, default=None, help="the first N tasks (default: all 50)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-repeats", type=int, default=3, help="runs of each mixed-batch measurement")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(args.threads)
    work = tasks()[: args.tasks]
    methods = build(args)
    with torch.inference_mode():
        measure(methods, work, args.max_tokens)
    base = methods[0].engine
    batch_config = replace(base.config, draft=args.drafts[0], max_num_seqs=FREE_ROWS + 1)
    engines = {tokens: Engine(replace(batch_config, grammar_draft_tokens=tokens), base.target, base.tokenizer)
               for tokens in (batch_config.grammar_draft_tokens, 0)}
    neighbours = {"none": (None, engines[batch_config.grammar_draft_tokens]),
                  "free": ("free", engines[batch_config.grammar_draft_tokens]),
                  "structured": ("structured", engines[batch_config.grammar_draft_tokens]),
                  "structured, no grammar drafts": ("structured", engines[0])}
    lengths = [len(out) for out in methods[0].outputs]
    with torch.inference_mode():
        batch = {name: [mixed_batch(engine, work, lengths, kind) for _ in range(args.batch_repeats)]
                 for name, (kind, engine) in neighbours.items()}
    text = report(args, methods, len(work)) + batch_report(args, batch)
    print(text)
    name = args.name or f"structured-{Path(args.model).name}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text)
    rows = [{"method": m.name, "tokens": m.tokens, "seconds": m.seconds, "valid": m.valid, "equal": m.equal,
             "spec_decode": m.metrics.to_dict()} for m in methods]
    (args.out / f"{name}.json").write_text(json.dumps({"command": args.argv, "tasks": len(work), "methods": rows,
                                                       "batch": batch}, indent=2))


if __name__ == "__main__":
    main()
