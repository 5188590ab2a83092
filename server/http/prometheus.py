"""Prometheus adapter: exports the scheduler's per-sequence metrics on `GET /metrics`.

The metrics themselves are plain data (`SpecMetrics`, `SequenceRecord`); this module only turns
them into Prometheus series, under the names users already scrape from vLLM. Every series carries a
`model_name` label. Each app owns a `CollectorRegistry`, so several apps in one process never clash.

Speculative decoding (counters, exposed with the `_total` suffix), updated after every step:

- `vllm:spec_decode_num_drafts`          += verify steps that checked at least one draft token (as
  vLLM counts drafts: a step whose drafter found nothing, or whose tree the batch planner cut to
  its root, is no draft; `SpecMetrics.drafted_steps`)
- `vllm:spec_decode_num_draft_tokens`    += draft tokens proposed (all verified tree nodes, root excluded)
- `vllm:spec_decode_num_accepted_tokens` += draft tokens accepted (bonus token excluded)
- `vllm:spec_decode_num_accepted_tokens_per_pos{position=i}` += steps whose depth-(i+1) draft was
  accepted (position 0 = the first draft token after the root)

so that, over any scrape interval,
  mean accepted length (incl. bonus) = 1 + d(accepted_tokens) / d(num_drafts),
  draft acceptance rate             = d(accepted_tokens) / d(draft_tokens),
  acceptance rate at position i     = d(accepted_tokens_per_pos{position=i}) / d(num_drafts),
vLLM's definitions, per drafted step: the same dashboards read both servers. A request's own
`spec_decode.mean_accepted_length` is per verify step, drafted or not (`SpecMetrics`), so it is
lower where some steps drafted nothing.

Requests, observed when a sequence (one choice of a request) ends:

- `vllm:request_success_total{finished_reason}`: sequences that ended with "stop" or "length";
  `specserve:request_aborted_total{reason}` counts "abort" (client gone) and "error" ones;
- `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`: tokens in and out;
- `vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`: prompt tokens of sequences whose
  prompt was looked up in the KV cache (just before its first prefill chunk), and of those the ones
  found there (prefix caching), so d(hits) / d(queries) is the prefix cache hit rate (counted when
  such a sequence ends, any way it ends);
- the histograms below observe finished ("stop"/"length") sequences only:
- `vllm:time_to_first_token_seconds` = first token time - arrival (arrival = the HTTP request's
  receipt, so queueing and image decoding are included);
- `vllm:time_per_output_token_seconds` = (finish - first token) / (output tokens - 1), observed only
  for sequences with at least 2 output tokens (speculative steps emit several tokens at once, so
  this is the mean over the decode phase, not one step's latency);
- `vllm:e2e_request_latency_seconds` = finish - arrival;
- `specserve:http_requests_total{endpoint, status}`: HTTP responses (endpoint = the route, or
  "other" for paths no route serves);
- gauges `vllm:num_requests_running` (sequences holding KV memory) and `vllm:num_requests_waiting`,
  read from the scheduler at scrape time.

The suffix drafter (`--draft suffix`), counters read from its `SuffixStats` at scrape time (absent
with any other drafter):

- `specserve:suffix_proposals_total`: draft trees it proposed (roots alone included);
- `specserve:suffix_shared_proposals_total`: of those, trees with a node taken from past outputs;
- `specserve:suffix_draft_nodes_total`: draft nodes proposed (root excluded, before the batch
  planner cuts a tree, so more than `vllm:spec_decode_num_draft_tokens` when it does);
- `specserve:suffix_shared_nodes_total`: of those, nodes that past outputs support,

so d(shared_proposals) / d(proposals) is the share of drafts the shared store helped, and
d(shared_nodes) / d(draft_nodes) the share of draft nodes it supplied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine.drafters import SuffixStats
from ..engine.events import SequenceRecord
from ..engine.metrics import SpecMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class _QueueGauges(Collector):
    """Running/waiting counts and KV cache usage, read when scraped so they are never stale."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int], kv_usage: Callable[[], float],
                 model_name: Callable[[], str]) -> None:
        self._running, self._waiting, self._model_name = running, waiting, model_name
        self._kv_usage = kv_usage

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names only: the registry asks at registration, before there is anything to read.
        for name, doc, _ in self._gauges():
            yield GaugeMetricFamily(name, doc, labels=["model_name"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, doc, read in self._gauges():
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self._model_name()], read())
            yield gauge

    def _gauges(self) -> tuple:
        return (
            ("vllm:num_requests_running", "Sequences being decoded (holding KV memory).", self._running),
            ("vllm:num_requests_waiting", "Sequences waiting for a decoding slot.", self._waiting),
            ("vllm:kv_cache_usage_perc", "Share of the KV cache's token rows in use (1 = 100%).", self._kv_usage),
        )


class _SuffixCounters(Collector):
    """The suffix drafter's counters, read when scraped: the drafter counts on the engine's thread and
    only ever adds, so a scrape sees a monotonic count without the engine reporting to anyone."""

    COUNTERS = (
        ("specserve:suffix_proposals", "Draft trees the suffix drafter proposed.", "proposals"),
        ("specserve:suffix_shared_proposals", "Suffix draft trees with nodes from past outputs.",
         "shared_proposals"),
        ("specserve:suffix_draft_nodes", "Draft nodes the suffix drafter proposed.", "draft_nodes"),
        ("specserve:suffix_shared_nodes", "Suffix draft nodes supported by past outputs.", "shared_nodes"),
    )

    def __init__(self, stats: Callable[[], SuffixStats | None], model_name: Callable[[], str]) -> None:
        self._stats, self._model_name = stats, model_name

    def describe(self) -> Iterator[CounterMetricFamily]:
        for name, doc, _ in self.COUNTERS:
            yield CounterMetricFamily(name, doc, labels=["model_name"])

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._stats()
        if stats is None:  # another drafter, or the model is still loading
            return
        for name, doc, field in self.COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self._model_name()], getattr(stats, field))
            yield counter


class PrometheusMetrics:
    """The app's series; implements the scheduler's `SchedulerObserver`. `suffix_stats` returns the
    suffix drafter's counters (None with another drafter)."""

    def __init__(self, model_name: Callable[[], str], running: Callable[[], int],
                 waiting: Callable[[], int], kv_usage: Callable[[], float],
                 suffix_stats: Callable[[], SuffixStats | None] = lambda: None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._model_name = model_name
        reg, label = self.registry, ["model_name"]
        self.num_drafts = Counter("vllm:spec_decode_num_drafts", "Verify steps with a draft.", label,
                                  registry=reg)
        self.draft_tokens = Counter(
            "vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", label, registry=reg)
        self.accepted_tokens = Counter(
            "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", label, registry=reg)
        self.accepted_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens by position.",
            ["model_name", "position"], registry=reg)
        self.success = Counter(
            "vllm:request_success", "Sequences finished.", ["model_name", "finished_reason"], registry=reg)
        self.aborted = Counter(
            "specserve:request_aborted", "Sequences cancelled or failed.", ["model_name", "reason"],
            registry=reg)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", label, registry=reg)
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the KV cache.", label, registry=reg)
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the KV cache.", label, registry=reg)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", label, registry=reg)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", label,
                              buckets=TTFT_BUCKETS, registry=reg)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Mean time per output token.",
                              label, buckets=TPOT_BUCKETS, registry=reg)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", label,
                             buckets=E2E_BUCKETS, registry=reg)
        self.http_requests = Counter(
            "specserve:http_requests", "HTTP responses by route and status.", ["endpoint", "status"],
            registry=reg)
        reg.register(_QueueGauges(running, waiting, kv_usage, model_name))
        reg.register(_SuffixCounters(suffix_stats, model_name))

    def on_step(self, delta: SpecMetrics) -> None:
        if delta.verify_steps == 0:  # prefill: nothing was drafted
            return
        name = self._model_name()
        self.num_drafts.labels(name).inc(delta.drafted_steps)
        self.draft_tokens.labels(name).inc(delta.proposed_draft_tokens)
        self.accepted_tokens.labels(name).inc(delta.accepted_draft_tokens)
        for position, count in enumerate(delta.accepted_per_position):
            if count:
                self.accepted_per_pos.labels(name, str(position)).inc(count)

    def on_finish(self, record: SequenceRecord) -> None:
        name = self._model_name()
        if record.cached_prompt_tokens is not None:  # its prompt was looked up
            self.prefix_queries.labels(name).inc(record.prompt_tokens)
            self.prefix_hits.labels(name).inc(record.cached_prompt_tokens)
        if record.finish_reason not in ("stop", "length"):
            # Cancelled and failed sequences are counted, but kept out of the latency histograms.
            self.aborted.labels(name, record.finish_reason).inc()
            return
        self.success.labels(name, record.finish_reason).inc()
        self.prompt_tokens.labels(name).inc(record.prompt_tokens)
        self.generation_tokens.labels(name).inc(record.output_tokens)
        self.e2e.labels(name).observe(record.finish_time - record.arrival)
        if record.first_token_time is None:
            return
        self.ttft.labels(name).observe(record.first_token_time - record.arrival)
        if record.output_tokens > 1:
            decode_time = record.finish_time - record.first_token_time
            self.tpot.labels(name).observe(decode_time / (record.output_tokens - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
