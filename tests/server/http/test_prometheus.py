"""The Prometheus adapter on literal inputs: vLLM's names with the `_total` suffix, the documented
formulas giving vLLM's per-draft figures from `SpecMetrics`' counts, the latency histograms, and
scrape-time gauges."""

from __future__ import annotations

import copy

from prometheus_client.parser import text_string_to_metric_families

from specserve.server.engine.events import SequenceRecord, spec_delta
from specserve.server.engine.metrics import SpecMetrics
from specserve.server.http.prometheus import PrometheusMetrics


def samples(metrics: PrometheusMetrics) -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape."""
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, frozenset({"model_name": "m", **labels}.items())), 0.0)


def test_spec_decode_counters_follow_the_step_deltas():
    metrics = PrometheusMetrics(lambda: "m", lambda: 0, lambda: 0, lambda: 0.0)
    seq = SpecMetrics()
    reported = SpecMetrics()
    # the second and fifth steps drafted nothing (no n-gram match, or the planner cut the tree)
    for proposed, accepted in [(4, 3), (0, 0), (4, 0), (4, 1), (0, 0), (6, 2)]:
        seq.observe(proposed, accepted)
        metrics.on_step(spec_delta(seq, reported))
        reported = copy.deepcopy(seq)
    scrape = samples(metrics)
    drafts = value(scrape, "vllm:spec_decode_num_drafts_total")
    draft_tokens = value(scrape, "vllm:spec_decode_num_draft_tokens_total")
    accepted = value(scrape, "vllm:spec_decode_num_accepted_tokens_total")
    per_pos = [value(scrape, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(3)]
    # vLLM's definitions: a draft is a step that verified at least one draft token
    assert (drafts, draft_tokens, accepted, per_pos) == (4, 18, 6, [3, 2, 1])
    assert (seq.verify_steps, seq.drafted_steps) == (6, 4)
    assert 1 + accepted / drafts == 2.5  # vLLM's mean acceptance length
    assert seq.mean_accepted_length == 2.0  # tokens per verify step, what a request reports
    assert accepted / draft_tokens == seq.acceptance_rate
    assert [p / drafts for p in per_pos] == [0.75, 0.5, 0.25]


def test_a_server_without_drafts_counts_no_drafts():
    metrics = PrometheusMetrics(lambda: "m", lambda: 0, lambda: 0, lambda: 0.0)
    seq = SpecMetrics()
    for _ in range(3):
        before = copy.deepcopy(seq)
        seq.observe(0, 0)  # `--draft none`: every step verifies the root alone
        metrics.on_step(spec_delta(seq, before))
    assert value(samples(metrics), "vllm:spec_decode_num_drafts_total") == 0
    assert seq.to_dict()["verify_steps"] == 3 and seq.to_dict()["drafted_steps"] == 0


def test_prefill_steps_do_not_count_as_drafts():
    metrics = PrometheusMetrics(lambda: "m", lambda: 0, lambda: 0, lambda: 0.0)
    metrics.on_step(SpecMetrics())
    assert value(samples(metrics), "vllm:spec_decode_num_drafts_total") == 0


def test_finished_sequences_feed_latency_histograms_and_counts():
    metrics = PrometheusMetrics(lambda: "m", lambda: 0, lambda: 0, lambda: 0.0)
    metrics.on_finish(SequenceRecord(arrival=10.0, first_token_time=10.5, finish_time=12.5, prompt_tokens=7,
                                     output_tokens=5, finish_reason="length"))
    metrics.on_finish(SequenceRecord(10.0, None, 10.2, 3, 0, "abort"))
    scrape = samples(metrics)
    assert value(scrape, "vllm:time_to_first_token_seconds_sum") == 0.5
    assert value(scrape, "vllm:time_per_output_token_seconds_sum") == 0.5  # 2.0 s over 4 later tokens
    assert value(scrape, "vllm:e2e_request_latency_seconds_sum") == 2.5
    assert value(scrape, "vllm:e2e_request_latency_seconds_count") == 1  # the aborted one is left out
    assert value(scrape, "vllm:time_to_first_token_seconds_bucket", le="0.5") == 1
    assert value(scrape, "vllm:time_to_first_token_seconds_bucket", le="0.25") == 0
    assert value(scrape, "vllm:request_success_total", finished_reason="length") == 1
    assert value(scrape, "specserve:request_aborted_total", reason="abort") == 1
    assert value(scrape, "vllm:prompt_tokens_total") == 7
    assert value(scrape, "vllm:generation_tokens_total") == 5


def test_prefix_cache_counters_count_sequences_that_got_a_slot():
    metrics = PrometheusMetrics(lambda: "m", lambda: 0, lambda: 0, lambda: 0.0)
    metrics.on_finish(SequenceRecord(10.0, 10.5, 12.5, 40, 5, "length", cached_prompt_tokens=39))
    metrics.on_finish(SequenceRecord(10.0, None, 10.2, 30, 0, "abort", cached_prompt_tokens=0))  # cancelled in prefill
    metrics.on_finish(SequenceRecord(10.0, None, 10.2, 50, 0, "abort"))  # cancelled while waiting: no lookup
    scrape = samples(metrics)
    assert value(scrape, "vllm:prefix_cache_queries_total") == 70
    assert value(scrape, "vllm:prefix_cache_hits_total") == 39


def test_queue_gauges_are_read_at_scrape_time():
    counts = {"running": 0, "waiting": 0, "kv": 0.0}
    metrics = PrometheusMetrics(lambda: "m", lambda: counts["running"], lambda: counts["waiting"],
                                lambda: counts["kv"])
    assert value(samples(metrics), "vllm:num_requests_running") == 0
    counts.update(running=3, waiting=5, kv=0.25)
    scrape = samples(metrics)
    assert value(scrape, "vllm:num_requests_running") == 3
    assert value(scrape, "vllm:num_requests_waiting") == 5
    assert value(scrape, "vllm:kv_cache_usage_perc") == 0.25


def test_each_adapter_has_its_own_registry():
    first = PrometheusMetrics(lambda: "m", lambda: 0, lambda: 0, lambda: 0.0)
    second = PrometheusMetrics(lambda: "m", lambda: 0, lambda: 0, lambda: 0.0)  # would raise on a shared registry
    first.on_step(SpecMetrics(1, 2, 1, [1], drafted_steps=1))
    assert value(samples(first), "vllm:spec_decode_num_drafts_total") == 1
    assert value(samples(second), "vllm:spec_decode_num_drafts_total") == 0
