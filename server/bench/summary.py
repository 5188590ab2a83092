"""A run's summary in the terms `vllm bench serve` users know (throughput; TTFT, TPOT, ITL and e2e
latency as mean / median / p90 / p99) plus speculative decoding from the server's counters: acceptance
rate = accepted / drafted tokens, mean accepted length = 1 + accepted / drafts (the bonus token
included), per-position acceptance = drafts whose depth-(i+1) token was accepted / drafts, where a draft
is a step that verified at least one draft token (vLLM's counting, which specserve's `/metrics` follows)."""

from __future__ import annotations

import numpy as np

from .client import RequestResult

LATENCIES = (("ttft_ms", "Time to first token"), ("tpot_ms", "Time per output token (after the first)"),
             ("itl_ms", "Inter-token latency (per chunk)"), ("e2el_ms", "End-to-end latency"))


def stats_ms(seconds: list[float]) -> dict | None:
    if not seconds:
        return None
    values = np.asarray(seconds) * 1000
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99))}


def spec_summary(delta: dict | None) -> dict | None:
    if delta is None:
        return None
    drafts, drafted, accepted = delta["drafts"], delta["draft_tokens"], delta["accepted_tokens"]
    return {"drafts": drafts, "draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None,
            "per_position_acceptance": [a / drafts for a in delta["per_position"]] if drafts else []}


def summarise(results: list[RequestResult], wall: float, spec_delta: dict | None = None) -> dict:
    """One run: `results` of `client.run`, its wall time, and the counters it added (`counters_delta`)."""
    ok = [r for r in results if r.error is None]
    output = sum(r.tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok) if ok and all(r.prompt_tokens is not None for r in ok) else None
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "error_messages": sorted({r.error for r in results if r.error})[:5],
        "duration_s": wall, "total_input_tokens": prompt, "total_output_tokens": output,
        "request_throughput": len(ok) / wall, "output_throughput": output / wall,
        "total_token_throughput": (prompt + output) / wall if prompt is not None else None,
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "tpot_ms": stats_ms([(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]),
        "itl_ms": stats_ms([gap for r in ok for gap in r.itls]),
        "e2el_ms": stats_ms([r.e2e for r in ok]),
        "spec_decode": spec_summary(spec_delta),
    }


def _line(name: str, value, spec: str = ".2f") -> str:
    shown = "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)
    return f"{name + ':':<42}{shown:>12}"


def format_summary(title: str, s: dict) -> str:
    """The block printed after each run."""
    lines = [f" {title} ".center(54, "="),
             _line("Successful requests", s["completed"]), _line("Failed requests", s["failed"]),
             _line("Benchmark duration (s)", s["duration_s"]),
             _line("Total input tokens", s["total_input_tokens"]),
             _line("Total generated tokens", s["total_output_tokens"]),
             _line("Request throughput (req/s)", s["request_throughput"]),
             _line("Output token throughput (tok/s)", s["output_throughput"]),
             _line("Total token throughput (tok/s)", s["total_token_throughput"])]
    for key, heading in LATENCIES:
        lines.append(f" {heading} ".center(54, "-"))
        for stat in ("mean", "median", "p90", "p99"):
            lines.append(_line(f"{stat.capitalize()} {key.removesuffix('_ms').upper()} (ms)",
                               s[key][stat] if s[key] else None))
    spec = s["spec_decode"]
    lines.append(" Speculative decoding (server's /metrics) ".center(54, "-"))
    if spec is None:
        lines.append("(the server exposes no speculative-decoding counters)")
    else:
        rate = spec["acceptance_rate"]
        lines += [_line("Drafts (steps with a draft)", int(spec["drafts"])),
                  _line("Draft tokens", int(spec["draft_tokens"])),
                  _line("Accepted draft tokens", int(spec["accepted_tokens"])),
                  _line("Acceptance rate (%)", None if rate is None else 100 * rate),
                  _line("Mean accepted length", spec["mean_accepted_length"]),
                  "Per-position acceptance (%): "
                  + (", ".join(f"{100 * a:.1f}" for a in spec["per_position_acceptance"]) or "-")]
    for message in s["error_messages"]:
        lines.append(f"error: {message}")
    return "\n".join(lines + ["=" * 54])


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    """A Markdown table, one row per (server label, load, summary)."""

    def p50_p99(stats: dict | None) -> str:
        return "-" if stats is None else f"{stats['median']:.0f} / {stats['p99']:.0f}"

    lines = ["| server | load | completed | failed | output tok/s | TTFT ms p50 / p99 | TPOT ms p50 / p99 | "
             "ITL ms p50 / p99 | mean accepted length | acceptance rate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, load, s in rows:
        spec = s["spec_decode"] or {}
        length, rate = spec.get("mean_accepted_length"), spec.get("acceptance_rate")
        lines.append(f"| {label} | {load} | {s['completed']} | {s['failed']} | {s['output_throughput']:.1f} | "
                     f"{p50_p99(s['ttft_ms'])} | {p50_p99(s['tpot_ms'])} | {p50_p99(s['itl_ms'])} | "
                     f"{'-' if length is None else f'{length:.2f}'} | {'-' if rate is None else f'{rate:.1%}'} |")
    return "\n".join(lines) + "\n"
