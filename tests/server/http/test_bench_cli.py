"""`specserve bench` over real sockets: against specserve (tiny LLaVA with n-gram drafting, text and
image requests), against a peer-like server that streams no usage and has no /metrics (as llama.cpp's
server), both in one run; plus its workload files, arrival process and summary arithmetic."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from PIL import Image

from specserve.server.bench import client, summary, workload
from specserve.server.bench.client import Options, RequestResult, Target
from specserve.server.cli import main
from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

MAX_TOKENS = 5
PEER_WORDS = ["alpha", " beta", " gamma", " delta", " epsilon", " zeta", " eta"]


@pytest.fixture(scope="module")
def specserve(launch, make_engine):
    with launch(create_app(make_engine("llava"), ServerSettings(served_model_name="tiny-llava"))) as running:
        yield running


def peer_app() -> tuple[FastAPI, list[dict]]:
    """An OpenAI-style server like llama.cpp's: one word per chunk, honours `min_tokens` (not
    `ignore_eos`), streams no usage, has no /metrics. Records the bodies it gets."""
    app, bodies = FastAPI(), []

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "peer-model", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        bodies.append(body)
        count = min(body.get("min_tokens") or 3, body["max_tokens"], len(PEER_WORDS))

        async def events():
            for word in PEER_WORDS[:count]:
                chunk = {"id": "x", "object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app, bodies


def test_a_sweep_over_specserve_and_a_peer_in_one_run(specserve, launch, tmp_path, capsys, tiny_model_dirs):
    app, bodies = peer_app()
    out = tmp_path / "bench.json"
    with launch(app) as peer:
        code = main(["bench", "--base-url", specserve.url + "/v1", "--base-url", peer.url, "--label", "specserve",
                     "--label", "peer", "--dataset", "mixed", "--num-prompts", "4", "--concurrency", "1", "2",
                     "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--no-progress",
                     "--tokenizer", str(tiny_model_dirs["llava"]), "--result-json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    records = json.loads(out.read_text())
    assert [(r["label"], r["concurrency"], r["model"]) for r in records] == [
        ("specserve", 1, "tiny-llava"), ("specserve", 2, "tiny-llava"), ("peer", 1, "peer-model"),
        ("peer", 2, "peer-model")]
    for record in records[:2]:  # specserve: usage and the speculative counters of /metrics
        s, requests = record["summary"], record["requests"]
        assert (s["completed"], s["failed"]) == (4, 0)
        assert all(r["tokens"] == MAX_TOKENS and 0 < r["ttft"] <= r["e2e"] for r in requests)
        assert s["total_output_tokens"] == 4 * MAX_TOKENS and s["total_input_tokens"] > 0
        # the counters' difference over the run is exactly what the streams reported, request by request
        assert s["spec_decode"]["drafts"] == sum(r["drafted_steps"] for r in requests)
        assert all(r["drafted_steps"] <= r["verify_steps"] for r in requests)
        assert s["spec_decode"]["accepted_tokens"] == sum(r["accepted"] for r in requests)
        assert s["ttft_ms"]["median"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"]
    assert [r["item"] for r in records[0]["requests"]] == [0, 1, 2, 3]  # the "mixed" set: text, image, ...
    for record in records[2:]:  # the peer: tokens counted from the text, no counters
        s = record["summary"]
        assert (s["completed"], s["failed"], s["spec_decode"], s["total_input_tokens"]) == (4, 0, None, None)
        assert s["total_output_tokens"] > 0
    assert all(b["min_tokens"] == MAX_TOKENS and b["ignore_eos"] is True for b in bodies)
    assert any(isinstance(b["messages"][0]["content"], list) for b in bodies)  # an image request
    assert "| specserve | concurrency 2 | 4 | 0 |" in printed and "| peer | concurrency 1 | 4 | 0 |" in printed
    assert "Mean accepted length" in printed and "exposes no speculative-decoding counters" in printed


def test_a_server_without_usage_needs_a_tokenizer(launch, capsys):
    app, _ = peer_app()
    with launch(app) as peer:
        code = main(["bench", "--base-url", peer.url, "--num-prompts", "2", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "Failed requests:" in printed and "needs --tokenizer" in printed


def test_refused_requests_are_counted_as_failures(specserve, capsys):
    code = main(["bench", "--base-url", specserve.url, "--model", "no-such-model", "--num-prompts", "2",
                 "--max-tokens", "3", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "HTTP 404" in printed or "HTTP 400" in printed


@pytest.mark.parametrize("argv, message", [
    (["--num-prompts", "0"], "must be positive"),
    (["--concurrency", "0"], "must be positive"),
    (["--label", "a", "--label", "b"], "2 --label values for 1 --base-url"),
])
def test_usage_errors(specserve, capsys, argv, message):
    assert main(["bench", "--base-url", specserve.url, "--model", "m", *argv]) == 2
    assert message in capsys.readouterr().err


def test_poisson_arrivals_and_the_concurrency_limit(specserve):
    target, options = Target(specserve.url, "tiny-llava", "s"), Options(max_tokens=3, ignore_eos=True)
    requests = workload.builtin("summarise-edit")
    results, wall = asyncio.run(client.run(target, requests, 6, options, request_rate=20.0, seed=7))
    rng, due = random.Random(7), [0.0]
    for _ in range(5):
        due.append(due[-1] + rng.expovariate(20.0))
    # request i starts no earlier than its drawn arrival time (and the sleeps add up to at least it)
    assert all(r.error is None for r in results)
    assert all(r.sent >= d - 1e-3 for r, d in zip(results, due)) and wall >= due[-1]

    results, _ = asyncio.run(client.run(target, requests, 6, options, concurrency=2))
    spans = [(r.sent, r.sent + r.e2e) for r in results]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2  # never more than 2 in flight
    assert [r.item for r in results] == list(range(6))


def test_builtin_sets_and_jsonl_files(tmp_path):
    mixed = workload.builtin("mixed")
    assert len(mixed) == 2 * len(workload.PROMPT_SETS["summarise-edit"])
    image_part = mixed[1].messages[0]["content"][0]
    picture = Image.open(io.BytesIO(base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])))
    assert picture.size == (96, 96) and isinstance(mixed[0].messages[0]["content"], str)
    assert all(isinstance(r.messages[0]["content"], list) for r in workload.builtin("images"))

    workload.shape_image(0).save(tmp_path / "red.png")
    lines = [{"prompt": "hello", "max_tokens": 7}, {"prompt": "what is it?", "image": "red.png"},
             {"prompt": "remote", "image": "https://example.com/x.png"},
             {"messages": [{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"}]}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    loaded = workload.load_jsonl(tmp_path / "set.jsonl")
    assert [r.max_tokens for r in loaded] == [7, None, None, None]
    assert loaded[1].messages[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert loaded[2].messages[0]["content"][0]["image_url"]["url"] == "https://example.com/x.png"
    assert loaded[3].messages == lines[3]["messages"]
    body = client.request_body(Target("u", "m", "l"), loaded[0], Options(max_tokens=50))
    assert body["max_tokens"] == 7 and "ignore_eos" not in body and body["stream"] is True


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "JSON object"), ('{"text": "x"}', '"prompt"'), ('{"prompt": "x", "max_tokens": 0}', "positive"),
    ('{"prompt": "x", "max_tokens": true}', "positive"), ('{"prompt": "x", "image": 3}', "file path or a URL"),
    ('{"messages": [], "prompt": "x"}', "non-empty"), ('{"prompt": "x", "image": "missing.png"}', "missing.png"),
    ("not json", "set.jsonl:2"),
])
def test_bad_jsonl_lines_name_their_line(tmp_path, line, message):
    (tmp_path / "set.jsonl").write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match="set.jsonl:2") as error:
        workload.load_jsonl(tmp_path / "set.jsonl")
    assert message in str(error.value)


def test_summary_of_literal_requests():
    results = [
        RequestResult(0, ttft=0.1, e2e=1.1, itls=[0.5, 0.5], tokens=11, prompt_tokens=20),  # TPOT 0.1
        RequestResult(1, ttft=0.3, e2e=2.3, itls=[1.0, 1.0], tokens=11, prompt_tokens=30),  # TPOT 0.2
        RequestResult(2, error="ValueError: HTTP 429: busy"),
    ]
    delta = {"drafts": 10.0, "draft_tokens": 40.0, "accepted_tokens": 15.0, "per_position": [8.0, 5.0, 2.0]}
    s = summary.summarise(results, wall=2.5, spec_delta=delta)
    assert (s["completed"], s["failed"], s["error_messages"]) == (2, 1, ["ValueError: HTTP 429: busy"])
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (50, 22)
    assert s["output_throughput"] == pytest.approx(22 / 2.5) and s["total_token_throughput"] == pytest.approx(72 / 2.5)
    assert s["ttft_ms"]["mean"] == pytest.approx(200) and s["ttft_ms"]["p99"] == pytest.approx(298)
    assert s["tpot_ms"]["median"] == pytest.approx(150) and s["itl_ms"]["p90"] == pytest.approx(1000)
    spec = s["spec_decode"]
    assert spec["acceptance_rate"] == pytest.approx(15 / 40) and spec["mean_accepted_length"] == pytest.approx(2.5)
    assert spec["per_position_acceptance"] == pytest.approx([0.8, 0.5, 0.2])
    block = summary.format_summary("title", s)
    assert "Acceptance rate (%):" in block and "37.50" in block and "80.0, 50.0, 20.0" in block
    assert "HTTP 429" in block


def test_counter_scrapes_and_their_difference(specserve):
    before = client.spec_counters(specserve.url)
    results, _ = asyncio.run(client.run(Target(specserve.url, "tiny-llava", "s"), workload.builtin("repeated"), 2,
                                        Options(max_tokens=8, ignore_eos=True)))
    delta = client.counters_delta(before, client.spec_counters(specserve.url))
    assert delta["drafts"] == sum(r.drafted_steps for r in results)  # steps that verified a draft token
    assert sum(delta["per_position"]) == delta["accepted_tokens"] == sum(r.accepted for r in results)
    assert client.counters_delta(None, before) is None
    assert client.spec_counters("http://127.0.0.1:9") is None  # nothing listens: no counters, no exception
