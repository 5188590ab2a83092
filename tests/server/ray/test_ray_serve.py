"""specserve on Ray Serve: a local Ray instance, 2 replicas of the tiny LLaVA model (text and
images), the `openai` client through Ray's proxy; conversation affinity; the replicas' spec-decode
counters on Ray's metrics port; a replica killed under load; a shutdown that ends a running stream
with an error event and `[DONE]` and leaves no Ray process. Slow (Ray starts in ~10 s, each replica
loads its own engine); `.ci/run` installs the `ray` extra and runs them."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ray = pytest.importorskip("ray", reason="the Ray tests need the `ray` extra: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="the Ray tests need the `ray` extra: pip install -e '.[ray]'")

from specserve.server.engine.config import EngineConfig  # noqa: E402
from specserve.server.http.settings import ServerSettings  # noqa: E402
from specserve.server.ray.cli import undeploy  # noqa: E402
from specserve.server.ray.deployment import ReplicaOptions, build_application  # noqa: E402
from specserve.server.ray.routing import rendezvous_order  # noqa: E402

pytestmark = pytest.mark.slow
REPLICA = "x-specserve-replica"
RAY_DAEMONS = {"raylet", "gcs_server"}
SHUTDOWN_S = 1.0  # the replicas' --shutdown-timeout
MIRRORED = ("num_drafts", "num_accepted_tokens")  # checked end to end on Ray's metrics port
CONTEXT = 8192  # so that a stream with ignore_eos outlasts a kill or a drain however fast the machine


@dataclass(frozen=True)
class Cluster:
    url: str  # Ray's HTTP proxy
    metrics_url: str  # Ray's metrics agent (Prometheus text)
    started: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def running_replicas() -> int:
    status = serve.status().applications["specserve"].deployments["specserve"]
    return status.replica_states.get("RUNNING", 0)


def alive_actors() -> list[dict]:
    """The GCS's actor table (`ray.util.state` needs the dashboard, which the fixture leaves off)."""
    return [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]


@pytest.fixture(scope="module")
def long_llava(tiny_model_dirs, tmp_path_factory) -> Path:
    """The tiny LLaVA with a CONTEXT-token context (its random weights do not mind the positions)."""
    dest = tmp_path_factory.mktemp("ray") / "llava"
    shutil.copytree(tiny_model_dirs["llava"], dest)
    config = json.loads((dest / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = CONTEXT
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def cluster(long_llava):
    """Ray with 2 replicas (1 CPU and 1 torch thread each) on this machine, its metrics exported on a
    known port. The last test shuts it down and checks that nothing is left."""
    started = time.time()
    metrics_port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # a fixed tree budget: the replicas draft whenever n-gram finds a match, not as a timing-based
    # planner decides, so their draft counters grow on every run
    config = EngineConfig(model=str(long_llava), draft="ngram", max_model_len=CONTEXT, batch_tree_tokens=64)
    options = ReplicaOptions(replicas=2, shutdown_timeout_s=SHUTDOWN_S)
    app = build_application(config, ServerSettings(ui=False), threads=1, options=options)
    serve.run(app, name="specserve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_until_the_proxy_routes_to_every_replica(url)
    yield Cluster(url, f"http://127.0.0.1:{metrics_port}/metrics", started)
    if ray.is_initialized():  # a test failed before the shutdown test
        serve.shutdown()
        ray.shutdown()


def wait_until_the_proxy_routes_to_every_replica(url: str, timeout_s: float = 60.0) -> None:
    """`serve.run` returns once both replicas are healthy, but Ray's proxy learns the replica set on its
    own, a moment later: until then it routes every request to the one it knows. Waits until a request
    homed on each replica (the router's own hash) is answered by it."""
    deadline = time.monotonic() + timeout_s
    while True:
        homes = conversations_homed_on_each(per_replica=1)
        answered = {replica: httpx.get(f"{url}/health", headers={"X-Conversation-Id": conversation}).headers[REPLICA]
                    for replica, (conversation,) in homes.items()}
        if all(replica == answer for replica, answer in answered.items()):
            return
        assert time.monotonic() < deadline, f"Ray's proxy still routes to one replica only: {answered}"
        time.sleep(0.5)


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60, **kwargs)


@functools.cache
def model_id(url: str) -> str:
    return client(url).models.list().data[0].id


def stream_chat(url: str, text: str, conversation: str | None = None, max_tokens: int = 24) -> tuple[str, str]:
    """(replica that answered, finish_reason) of one streamed chat."""
    headers = {"X-Conversation-Id": conversation} if conversation else {}
    raw = client(url).chat.completions.with_raw_response.create(
        model=model_id(url), messages=[{"role": "user", "content": text}], max_tokens=max_tokens, stream=True,
        extra_headers=headers)
    finish = [c.choices[0].finish_reason for c in raw.parse() if c.choices and c.choices[0].finish_reason]
    return raw.headers[REPLICA], finish[-1]


def test_models_and_health_through_the_proxy(cluster):
    url = cluster.url
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    models = client(url).models.list().data
    assert len(models) == 1 and models[0].id.endswith("llava")


def test_16_concurrent_streams_are_all_answered_by_both_replicas(cluster):
    url = cluster.url
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: stream_chat(url, f"count to {i}: one two three"), range(16)))
    assert all(finish in ("stop", "length") for _, finish in results)
    assert len({replica for replica, _ in results}) == 2, "Ray's proxy used one replica only"


def test_an_image_chat_works_through_the_proxy(cluster):
    url = cluster.url
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    reply = client(url).chat.completions.create(
        model=model_id(url), max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                               {"type": "text", "text": "what colour?"}]}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 10  # the image's tokens are in the prompt


def test_bad_input_is_an_openai_400_through_the_proxy(cluster):
    url = cluster.url
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": [], "max_tokens": -1})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def replica_ids() -> list[str]:
    """The running replicas' ids (the last part of their actor names), as the router and the
    `x-specserve-replica` header name them."""
    return sorted(a["Name"].rsplit("#", 1)[-1] for a in alive_actors() if a["Name"].startswith("SERVE_REPLICA::"))


def conversations_homed_on_each(per_replica: int) -> dict[str, list[str]]:
    """{replica: conversation ids whose rendezvous home is that replica}, chosen with the router's
    own hash over the ids Ray drew this run, so that both replicas get conversations (six names
    picked at random would all land on one replica once in 32 runs)."""
    ids = replica_ids()
    assert len(ids) == 2, ids
    homed: dict[str, list[str]] = {replica: [] for replica in ids}
    for i in range(1000):
        name = f"conversation-{i}"
        home = homed[rendezvous_order(name, ids)[0]]
        if len(home) < per_replica:
            home.append(name)
        if all(len(names) == per_replica for names in homed.values()):
            return homed
    raise AssertionError(f"1000 conversation ids did not give each replica {per_replica}: {homed}")


def test_a_conversation_stays_on_its_home_replica(cluster):
    url = cluster.url
    for home, conversations in conversations_homed_on_each(per_replica=3).items():
        for conversation in conversations:
            replicas = {stream_chat(url, f"turn {turn}", conversation, max_tokens=4)[0] for turn in range(4)}
            assert replicas == {home}, f"conversation {conversation} (home {home}) was served by {replicas}"


def replica_counters(url: str) -> dict[str, dict[str, float]]:
    """{replica: {counter: value}} of each replica's own `/metrics`, asked through the proxy with a
    conversation id homed on that replica (without one, Ray's default policy may keep choosing the
    same idle replica for as long as its cached queue lengths say so)."""
    seen: dict[str, dict[str, float]] = {}
    for replica, (conversation,) in conversations_homed_on_each(per_replica=1).items():
        response = httpx.get(f"{url}/metrics", headers={"X-Conversation-Id": conversation})
        assert response.headers[REPLICA] == replica, f"/metrics for {replica} came from {response.headers[REPLICA]}"
        seen[replica] = {
            family.name.removeprefix("vllm:spec_decode_"): sum(s.value for s in family.samples
                                                              if s.name.endswith("_total"))
            for family in text_string_to_metric_families(response.text)
            if family.name.removeprefix("vllm:spec_decode_") in MIRRORED}
    return seen


def ray_counters(metrics_url: str) -> dict[str, dict[str, float]]:
    """{replica: {counter: value}} of the mirrored counters on Ray's own metrics port."""
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        name = family.name.removeprefix("ray_specserve_spec_decode_")
        if name in MIRRORED:
            for sample in family.samples:
                values = found.setdefault(sample.labels["replica"], dict.fromkeys(MIRRORED, 0.0))
                values[name] += sample.value
    return found


def test_rays_metrics_port_exports_each_replicas_spec_counters(cluster):
    url = cluster.url
    conversations = [name for names in conversations_homed_on_each(per_replica=4).values() for name in names]
    with ThreadPoolExecutor(4) as pool:  # repetitive prompts, so n-gram drafts get accepted on both replicas
        list(pool.map(lambda name: stream_chat(url, "one two three " * 6, name, max_tokens=32), conversations))
    own = replica_counters(url)  # nothing runs from here on, so the counters stand still
    assert all(values["num_drafts"] > 0 for values in own.values()), own
    deadline = time.monotonic() + 60  # each replica copies every second; Ray exports every few seconds
    while (exported := ray_counters(cluster.metrics_url)) != own:
        assert time.monotonic() < deadline, f"Ray exports {exported}, the replicas count {own}"
        time.sleep(1)


def test_a_killed_replica_fails_its_streams_and_ray_replaces_it(cluster):
    url = cluster.url
    victim_tag = stream_chat(url, "hello", "victim", max_tokens=2)[0]
    victim_pid = next(a["Pid"] for a in alive_actors() if a["Name"].endswith(victim_tag))
    elsewhere = next(c for c in (f"other-{k}" for k in range(50)) if stream_chat(url, "hi", c, 2)[0] != victim_tag)

    streaming = [threading.Event() for _ in range(8)]

    def long_stream(i: int) -> str:
        """The victim's streams run up to the context whatever the model says (ignore_eos), so they still
        run at the kill; the survivor's are short."""
        try:
            for _ in client(url).chat.completions.create(
                    model=model_id(url), messages=[{"role": "user", "content": f"long answer {i}"}],
                    max_tokens=CONTEXT - 100 if i % 2 else 200, stream=True, extra_body={"ignore_eos": True},
                    extra_headers={"X-Conversation-Id": "victim" if i % 2 else elsewhere}):
                streaming[i].set()
            return "ok"
        except (openai.APIError, httpx.HTTPError) as exc:
            return type(exc).__name__
        finally:
            streaming[i].set()

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(long_stream, i) for i in range(8)]
        assert all(event.wait(60) for event in streaming), "the streams did not start"
        os.kill(victim_pid, signal.SIGKILL)
        outcomes = [f.result(timeout=90) for f in futures]
    assert time.monotonic() - started < 90, "a request hung after its replica died"
    assert outcomes[0::2] == ["ok"] * 4, f"streams on the surviving replica failed: {outcomes}"
    # the victim's streams fail with a connection error (one not yet routed when it died may go elsewhere)
    assert "APIConnectionError" in outcomes[1::2], f"no stream on the killed replica failed: {outcomes}"
    # new requests are answered meanwhile (by the survivor, or by the replacement once it is up)
    assert all(stream_chat(url, f"after {i}", max_tokens=4)[1] in ("stop", "length") for i in range(4))
    deadline = time.monotonic() + 120
    while running_replicas() < 2 or len(replica_actors := [
            a["Name"] for a in alive_actors() if a["Name"].startswith("SERVE_REPLICA::")]) < 2:
        assert time.monotonic() < deadline, "Ray did not replace the killed replica"
        time.sleep(1)
    assert not any(name.endswith(victim_tag) for name in replica_actors)


def stream_events(url: str, body: dict, out: list[tuple[float, str]], first: threading.Event) -> None:
    """Stream one chat completion; its `data:` payloads go to `out` with their arrival times."""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                out.append((time.monotonic(), line[len("data: "):]))
                first.set()


def test_shutdown_ends_a_running_stream_cleanly_and_leaves_no_ray_process(cluster):
    ours = [p for p in psutil.process_iter(["name", "create_time"])
            if p.info["name"] in RAY_DAEMONS and p.info["create_time"] >= cluster.started - 1]
    assert ours, "the fixture's Ray daemons were not found"
    # longer than the deadline: one token per step (no drafting) up to the context
    body = {"model": model_id(cluster.url), "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": CONTEXT - 100, "stream": True, "ignore_eos": True, "speculative": False}
    events: list[tuple[float, str]] = []
    first = threading.Event()
    stream = threading.Thread(target=stream_events, args=(cluster.url, body, events, first))
    stream.start()
    assert first.wait(30)
    stopping = time.monotonic()
    # `specserve ray-serve`'s shutdown: the application first (its replicas drain while the proxy still
    # forwards their last events: SHUTDOWN_S for running sequences, then the error event), then Serve
    undeploy(timeout_s=30)
    stream.join(30)
    assert not stream.is_alive()
    serve.shutdown()
    payloads = [payload for _, payload in events]
    assert payloads[-1] == "[DONE]", payloads[-3:]
    last = json.loads(payloads[-2])
    assert "error" in last, f"the stream was not ended by the drain: {last}"
    assert (last["error"]["type"], last["error"]["code"]) == ("server_error", "unavailable")
    assert all("choices" in json.loads(payload) for payload in payloads[:-2])
    ended = events[-1][0] - stopping
    assert SHUTDOWN_S <= ended < SHUTDOWN_S + 5, f"the stream ended {ended:.1f} s into the shutdown"
    assert any(stopping < arrival < stopping + SHUTDOWN_S for arrival, _ in events), "it did not run while draining"
    ray.shutdown()
    gone, alive = psutil.wait_procs(ours, timeout=30)
    assert not alive, f"left running: {[p.info['name'] for p in alive]}"
