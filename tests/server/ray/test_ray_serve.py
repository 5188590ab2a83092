"""specserve on Ray Serve: a local Ray instance, 2 replicas of the tiny LLaVA model (text and
images), the `openai` client through Ray's proxy; conversation affinity; a replica killed under
load; a clean shutdown. Slow (Ray starts in ~10 s, each replica loads its own engine); `.ci/run`
installs the `ray` extra and runs them."""

from __future__ import annotations

import base64
import functools
import io
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the Ray tests need the `ray` extra: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="the Ray tests need the `ray` extra: pip install -e '.[ray]'")

from specserve.server.engine.config import EngineConfig  # noqa: E402
from specserve.server.http.settings import ServerSettings  # noqa: E402
from specserve.server.ray.deployment import ReplicaOptions, build_application  # noqa: E402

pytestmark = pytest.mark.slow
REPLICA = "x-specserve-replica"
RAY_DAEMONS = {"raylet", "gcs_server"}


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
def cluster(tiny_model_dirs):
    """Ray with 2 replicas (1 CPU and 1 torch thread each) on this machine; yields the base URL.
    The last test shuts it down and checks that nothing is left."""
    started = time.time()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = EngineConfig(model=str(tiny_model_dirs["llava"]), draft="ngram", max_model_len=256)
    app = build_application(config, ServerSettings(ui=False), threads=1, options=ReplicaOptions(replicas=2))
    serve.run(app, name="specserve", route_prefix="/")
    yield f"http://127.0.0.1:{port}", started
    if ray.is_initialized():  # a test failed before the shutdown test
        serve.shutdown()
        ray.shutdown()


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
    url, _ = cluster
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    models = client(url).models.list().data
    assert len(models) == 1 and models[0].id.endswith("llava")


def test_16_concurrent_streams_are_all_answered_by_both_replicas(cluster):
    url, _ = cluster
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: stream_chat(url, f"count to {i}: one two three"), range(16)))
    assert all(finish in ("stop", "length") for _, finish in results)
    assert len({replica for replica, _ in results}) == 2, "Ray's proxy used one replica only"


def test_an_image_chat_works_through_the_proxy(cluster):
    url, _ = cluster
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
    url, _ = cluster
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": [], "max_tokens": -1})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_conversation_stays_on_one_replica(cluster):
    url, _ = cluster
    homes = {}
    for conversation in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta"):
        replicas = {stream_chat(url, f"turn {turn}", conversation, max_tokens=4)[0] for turn in range(4)}
        assert len(replicas) == 1, f"conversation {conversation} was served by {replicas}"
        homes[conversation] = replicas.pop()
    assert len(set(homes.values())) == 2, "six conversations should not all hash to one replica"


def test_a_killed_replica_fails_its_streams_and_ray_replaces_it(cluster):
    url, _ = cluster
    victim_tag = stream_chat(url, "hello", "victim", max_tokens=2)[0]
    victim_pid = next(a["Pid"] for a in alive_actors() if a["Name"].endswith(victim_tag))
    elsewhere = next(c for c in (f"other-{k}" for k in range(50)) if stream_chat(url, "hi", c, 2)[0] != victim_tag)

    def long_stream(i: int) -> str:
        try:
            stream_chat(url, f"long answer {i}", "victim" if i % 2 else elsewhere, max_tokens=200)
            return "ok"
        except (openai.APIError, httpx.HTTPError) as exc:
            return type(exc).__name__

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(long_stream, i) for i in range(8)]
        time.sleep(1.5)  # the streams are running
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


def test_shutdown_leaves_no_ray_process(cluster):
    _, started = cluster
    ours = [p for p in psutil.process_iter(["name", "create_time"])
            if p.info["name"] in RAY_DAEMONS and p.info["create_time"] >= started - 1]
    assert ours, "the fixture's Ray daemons were not found"
    serve.shutdown()
    ray.shutdown()
    gone, alive = psutil.wait_procs(ours, timeout=30)
    assert not alive, f"left running: {[p.info['name'] for p in alive]}"
