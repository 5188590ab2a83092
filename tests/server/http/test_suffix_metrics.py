"""The suffix drafter's counters on /metrics: read from its `SuffixStats` at scrape time, absent with
other drafters, and, over a real socket, the shared-store counters rise once a request can draft
from an earlier request's output."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from specserve.drafting.suffix import SuffixStats
from specserve.server.http.app import create_app
from specserve.server.http.prometheus import PrometheusMetrics

PROMPT = "def add(a, b):"
FIELDS = ("proposals", "shared_proposals", "draft_nodes", "shared_nodes")


def scrape(metrics: PrometheusMetrics) -> dict:
    """{sample name: value} of the suffix counters (model_name "m")."""
    return {sample.name: sample.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for sample in family.samples
            if sample.name.startswith("specserve:suffix_") and sample.labels == {"model_name": "m"}}


def test_counters_follow_the_drafters_stats():
    stats = SuffixStats()
    metrics = PrometheusMetrics(lambda: "m", lambda: 0, lambda: 0, lambda: 0.0, suffix_stats=lambda: stats)
    assert scrape(metrics) == {f"specserve:suffix_{field}_total": 0.0 for field in FIELDS}
    stats.proposals, stats.shared_proposals, stats.draft_nodes, stats.shared_nodes = 7, 2, 30, 5
    assert scrape(metrics) == {"specserve:suffix_proposals_total": 7.0, "specserve:suffix_shared_proposals_total": 2.0,
                               "specserve:suffix_draft_nodes_total": 30.0, "specserve:suffix_shared_nodes_total": 5.0}


def test_no_suffix_series_without_the_suffix_drafter():
    metrics = PrometheusMetrics(lambda: "m", lambda: 0, lambda: 0, lambda: 0.0)
    assert "specserve:suffix" not in metrics.exposition().decode()
    assert "vllm:spec_decode_num_drafts" in metrics.exposition().decode()  # the rest is there


@pytest.fixture(scope="module")
def server(launch, make_engine):
    # batch_tree_tokens=0: every step drafts (the planner cannot skip drafting), so every step counts
    with launch(create_app(make_engine("qwen2", draft="suffix", batch_tree_tokens=0))) as running:
        yield running


def counters(server) -> dict[str, float]:
    return {field: server.metric(f"specserve:suffix_{field}_total", model_name=server.state.model_name)
            for field in FIELDS}


def test_the_second_request_drafts_from_the_first_ones_output(server):
    client = server.openai()

    def ask() -> str:
        return client.completions.create(model=server.state.model_name, prompt=PROMPT, max_tokens=40,
                                         temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    assert "specserve:suffix_proposals_total{model_name=" in server.http().get("/metrics").text  # 0 before any
    first_text = ask()
    first = counters(server)
    assert first["proposals"] > 0 and first["draft_nodes"] > 0
    assert first["shared_proposals"] == first["shared_nodes"] == 0  # the store was empty
    assert ask() == first_text  # greedy: the same answer, now drafted partly from the store
    second = counters(server)
    assert second["proposals"] > first["proposals"] and second["draft_nodes"] > first["draft_nodes"]
    assert 0 < second["shared_proposals"] <= second["proposals"] - first["proposals"]
    assert 0 < second["shared_nodes"] <= second["draft_nodes"] - first["draft_nodes"]
