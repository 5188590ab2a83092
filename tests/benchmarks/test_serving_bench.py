"""The serving benchmark (`benchmarks/serving.py`): its summary on literal requests, and one whole run
(engine reference, `specserve serve` subprocess, streamed text and image requests) on the tiny LLaVA
model. No timing thresholds: the checks are counts and orderings that hold on any machine."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
from PIL import Image

from specserve.server.bench.client import RequestResult as Result

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def serving(benchmark_script):
    return benchmark_script("serving")


def test_summary_adds_the_overheads_to_the_bench_summary(serving):
    Timing = serving.EngineTiming
    results = [
        Result(0, ttft=0.1, e2e=1.1, itls=[0.5, 0.5], tokens=11),  # TPOT 0.1
        Result(1, ttft=0.3, e2e=2.3, itls=[1.0, 1.0], tokens=11),  # TPOT 0.2
        Result(2, error="HTTPStatusError: 429"),
        Result(3, ttft=0.3, e2e=2.3, itls=[1.0, 1.0], tokens=11),  # the workload cycled: item 3 is request 1
    ]
    timings = [Timing(prefill=0.05, decode=0.6, detok=0.1, tokens=11), Timing(0.05, 1.1, 0.1, 11)]
    spec = {"drafts": 10.0, "draft_tokens": 30.0, "accepted_tokens": 10.0, "per_position": [6.0, 4.0]}
    s = serving.summarise(results, wall=2.5, spec=spec, timings=timings, worker=[0.4, 2])

    assert (s["completed"], s["failed"], s["error_messages"]) == (3, 1, ["HTTPStatusError: 429"])
    assert s["ttft_ms"]["median"] == pytest.approx(300) and s["ttft_p99_over_p50"] == pytest.approx(300 / 300)
    assert s["output_throughput"] == pytest.approx(33 / 2.5)
    assert s["spec_decode"]["mean_accepted_length"] == pytest.approx(1 + 10 / 10)
    # The engine's decode time without detokenization: (0.5 + 1.0 + 1.0) s over 30 decode tokens.
    assert s["engine_tpot_s"] == pytest.approx(2.5 / 30) and s["detok_per_token_s"] == pytest.approx(0.01)
    assert s["client_tpot_mean_s"] == pytest.approx(0.5 / 3) and s["worker_tpot_mean_s"] == pytest.approx(0.2)
    assert s["overhead_per_token"] == pytest.approx((0.5 / 3) / (2.5 / 30) - 1)
    assert s["overhead_wall"] == pytest.approx(2.5 / (0.55 + 2 * 1.05) - 1)
    assert len(s["raw"]) == 4


def test_rounds_alternate_the_server_order_and_pool_every_request_and_counter(serving):
    assert serving.run_order(["a", "b", "c"], 3) == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    np = serving.np
    first = serving.Level([Result(0, ttft=0.1, e2e=1.1, itls=[], tokens=11)], 2.0,
                          {"drafts": 4.0, "accepted_tokens": 3.0, "per_position": [2.0, 1.0]}, np.array([0.3, 3]))
    second = serving.Level([Result(1, ttft=0.2, e2e=1.2, itls=[], tokens=11), Result(2, error="timeout")], 3.0,
                           {"drafts": 5.0, "accepted_tokens": 4.0, "per_position": [3.0]}, np.array([0.1, 1]))
    both = serving.pooled([first, second])
    assert [r.item for r in both.results] == [0, 1, 2] and both.wall == 5.0
    assert both.spec == {"drafts": 9.0, "accepted_tokens": 7.0, "per_position": [5.0, 1.0]}
    assert both.tpot.tolist() == [0.4, 4]
    assert serving.pooled([first, serving.Level([], 1.0, None, np.zeros(2))]).spec is None  # a peer without


def test_a_whole_run_against_a_served_tiny_vlm(serving, tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["llava"]
    runs = serving.main(["--model", str(model), "--drafts", "ngram", "--concurrency", "1", "2",
                         "--requests-per-client", "2", "--max-tokens", str(MAX_TOKENS), "--threads", "1",
                         "--rounds", "2", "--out", str(tmp_path)])

    assert json.loads((tmp_path / "serving-llava.json").read_text()).keys() == {"ngram"}
    assert Image.open(tmp_path / "serving-llava.png").format == "PNG"
    table = (tmp_path / "serving-llava.md").read_text()
    assert "| ngram | 1 | 4 | 0 |" in table and "| ngram | 2 | 8 | 0 |" in table  # 2 rounds pooled
    run = runs["ngram"]
    # Every other workload item carries an image (the model is a VLM); the engine ran each item once.
    assert len(run["engine"]) == 2 * len(serving.PROMPT_SETS["summarise-edit"])
    assert all(t["tokens"] == MAX_TOKENS and t["decode"] >= t["detok"] >= 0 for t in run["engine"])
    for concurrency, level in run["levels"].items():
        assert (level["completed"], level["failed"]) == (2 * 2 * concurrency, 0), level["error_messages"]
        assert len(level["round_throughput"]) == 2 and min(level["round_throughput"]) > 0
        assert {r["item"] for r in level["raw"]} >= {0, 1}  # a text request and an image request
        for r in level["raw"]:
            assert r["tokens"] == MAX_TOKENS  # ignore_eos: usage counts every requested token
            assert 0 < r["ttft"] <= r["e2e"]
            assert 1 <= len(r["itls"]) + 1 <= MAX_TOKENS  # one chunk per step that made text
            assert r["verify_steps"] >= 1 and 0 <= r["accepted"] <= MAX_TOKENS - 1
            assert 0 <= r["drafted_steps"] <= r["verify_steps"]
        assert level["ttft_ms"]["median"] <= level["ttft_ms"]["p90"] <= level["ttft_ms"]["p99"]
        # the server's counters over the level are what its streams reported
        assert level["spec_decode"]["drafts"] == sum(r["drafted_steps"] for r in level["raw"])
        # defined once the level drafted (whether 6-token answers draft at all is the planner's call)
        length = level["spec_decode"]["mean_accepted_length"]
        assert (length >= 1) if level["spec_decode"]["drafts"] else (length is None)
        assert level["output_throughput"] > 0
        assert level["worker_tpot_mean_s"] > 0 and level["overhead_wall"] is not None


@pytest.mark.parametrize("choices", [["on"], ["off"], ["on", "off"]])
def test_prefix_caching_choices_make_one_server_each_and_reach_vllm_only_when_all_off(serving, tiny_model_dirs,
                                                                                       choices):
    args = Namespace(model=str(tiny_model_dirs["llama"]), dtype="float32", threads=1, max_num_seqs=None,
                     max_model_len=None, prefix_caching=choices, vllm_python="python")
    servers = [serving.specserve_server(args, "ngram", "none", choice, "kernel") for choice in choices]
    labels = {"on": "ngram", "off": "ngram no-prefix-cache"}
    assert [s.label for s in servers] == [labels[c] for c in choices]
    assert [("--no-prefix-caching" in s.command, s.prefix_caching) for s in servers] == \
        [(c == "off", c == "on") for c in choices]
    vllm_off = ["--no-enable-prefix-caching" in s.command for s in serving.vllm_servers(args)]
    assert vllm_off == [choices == ["off"]] * 2


def test_attention_choices_make_one_server_each_named_unless_the_default(serving, tiny_model_dirs):
    args = Namespace(model=str(tiny_model_dirs["llama"]), dtype="float32", threads=1, max_num_seqs=None,
                     max_model_len=None)
    servers = [serving.specserve_server(args, "ngram", "none", "on", attention) for attention in ("kernel", "grouped")]
    assert [s.label for s in servers] == ["ngram", "ngram grouped-attention"]
    assert [s.command[s.command.index("--attention") + 1] for s in servers] == ["kernel", "grouped"]
    assert [s.attention for s in servers] == ["kernel", "grouped"]
