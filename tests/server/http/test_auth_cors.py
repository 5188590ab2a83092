"""The API key, CORS and request ids, over a real socket: a request without the key is refused before
its body is read, the official client gets in with it, browsers of allowed origins only, and every
response names its request."""

from __future__ import annotations

import argparse
import re
import socket

import openai
import pytest

from specserve.server.http.app import create_app
from specserve.server.http.serve import add_serve_arguments, settings_from_args
from specserve.server.http.settings import ServerSettings

KEY = "sk-test-0123456789"
ORIGIN = "http://playground.example"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def server(launch, make_engine):
    settings = ServerSettings(served_model_name="tiny", api_key=KEY, allowed_origins=(ORIGIN,))
    with launch(create_app(make_engine(), settings)) as running:
        yield running


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {KEY}", KEY, "Bearer", f"Bearer {KEY}x"])
def test_requests_without_the_key_get_401_with_an_openai_body(server, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    with server.http() as client:
        response = client.post("/v1/chat/completions", json=CHAT, headers=headers)
        models = client.get("/v1/models", headers=headers)
    assert response.status_code == 401 and models.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]


def test_the_official_client_gets_in_with_the_key_and_not_without(server):
    answer = server.openai(api_key=KEY).chat.completions.create(**CHAT)
    assert answer.choices[0].message.content is not None and answer.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="not-the-key").chat.completions.create(**CHAT)


def test_health_and_metrics_stay_open(server):
    with server.http() as client:
        assert client.get("/health").status_code == 200
        metrics = client.get("/metrics")
    assert metrics.status_code == 200
    # refused requests are counted like any other response
    assert server.metric("specserve:http_requests_total", endpoint="/v1/chat/completions", status="401") >= 1


def test_a_refused_request_is_answered_before_its_body_arrives(server):
    # a declared body that never comes: without the key the answer is 401 at once, not a 408 later
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\n\r\n{")
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 401 Unauthorized"


def test_an_allowed_origin_gets_its_preflight_and_reads_the_answers(server):
    with server.http() as client:
        preflight = client.options("/v1/chat/completions", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        answer = client.post("/v1/chat/completions", json=CHAT,
                             headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
        refused = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
    # the browser can read why it was refused
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


def test_another_origin_gets_no_cors_headers(server):
    with server.http() as client:
        preflight = client.options("/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        answer = client.post("/v1/chat/completions", json=CHAT,
                             headers={"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"})
    assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_every_response_carries_a_request_id(server):
    with server.http() as client:
        given = client.get("/health", headers={"X-Request-Id": "trace-42"})
        generated = [client.get("/health"), client.get("/v1/models"), client.get("/nowhere")]
        replaced = client.get("/health", headers={"X-Request-Id": "has space"})
        too_long = client.get("/health", headers={"X-Request-Id": "x" * 129})
    assert given.headers["x-request-id"] == "trace-42"
    ids = [r.headers["x-request-id"] for r in (*generated, replaced, too_long)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == len(ids)
    assert [r.status_code for r in generated] == [200, 401, 404]


def test_without_a_key_or_origins_the_api_is_open_and_sends_no_cors_headers(launch, make_engine):
    with launch(create_app(make_engine(), ServerSettings())) as running, running.http() as client:
        response = client.get("/v1/models", headers={"Origin": ORIGIN})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    assert response.headers["x-request-id"]


def test_the_key_comes_from_the_flag_or_the_environment(monkeypatch):
    def settings(*argv: str, env: str | None = None) -> ServerSettings:
        if env is None:
            monkeypatch.delenv("SPECSERVE_API_KEY", raising=False)
        else:
            monkeypatch.setenv("SPECSERVE_API_KEY", env)
        parser = argparse.ArgumentParser()
        add_serve_arguments(parser)
        return settings_from_args(parser.parse_args(list(argv)))

    assert settings().api_key is None and settings().allowed_origins == ()
    assert settings(env="from-env").api_key == "from-env"
    assert settings("--api-key", "from-flag", env="from-env").api_key == "from-flag"
    assert settings("--allowed-origins", ORIGIN, "http://b.example").allowed_origins == (ORIGIN, "http://b.example")
    with pytest.raises(ValueError, match="api_key must be a non-empty string"):
        ServerSettings(api_key=" padded ")

