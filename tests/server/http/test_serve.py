"""The command-line entry (`add_serve_arguments`, `run_serve`) and embedding: the app factory
mounted inside another FastAPI app, and several apps in one process."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from specserve.server.http.app import create_app
from specserve.server.http.serve import add_serve_arguments, run_serve, settings_from_args
from specserve.server.http.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_arguments_become_settings():
    args = parse("--model", "m", "--draft", "none", "--port", "9001", "--max-active", "3", "--max-queue", "5",
                 "--max-n", "2", "--max-images", "1", "--allow-remote-images", "--remote-image-timeout", "2.5",
                 "--served-model-name", "tiny")
    settings = settings_from_args(args)
    assert (args.model, args.draft, args.port, args.host) == ("m", "none", 9001, "127.0.0.1")
    assert settings == ServerSettings(served_model_name="tiny", max_active=3, max_queue=5, max_n=2, max_images=1,
                                      allow_remote_images=True, remote_image_timeout_s=2.5)
    assert settings_from_args(parse()) == ServerSettings()


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_active"):
        ServerSettings(max_active=0)
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServerSettings(default_max_tokens=0)


def test_run_serve_loads_the_model_behind_a_live_socket(monkeypatch, launch, tiny_model_dir):
    """`run_serve` with uvicorn's `Server.run` replaced by the test launcher: the model loads on the
    worker (health 503, then 200) and the API answers."""
    seen = {}
    real_run = uvicorn.Server.run  # the launcher's own server still runs for real

    def fake_run(server, sockets=None):
        if sockets is not None:
            return real_run(server, sockets=sockets)
        seen.update(host=server.config.host, port=server.config.port, log_level=server.config.log_level)
        with launch(server.config.app) as running, running.http() as http:
            deadline = time.monotonic() + 60
            while http.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            seen["models"] = http.get("/v1/models").json()
            seen["chat"] = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).status_code

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    args = parse("--model", str(tiny_model_dir), "--draft", "none", "--port", "8123",
                 "--served-model-name", "tiny")
    assert run_serve(args) == 0
    assert seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    assert seen["models"]["data"][0]["id"] == "tiny"
    assert seen["models"]["data"][0]["root"] == str(tiny_model_dir)
    assert seen["chat"] == 200


def test_a_model_that_cannot_load_stops_the_server_with_one_line(tmp_path):
    """`specserve serve` on a folder with no model: exit code 1, the reason on one line, no traceback
    (instead of a live server answering 503 for ever)."""
    missing = tmp_path / "no-model-here"
    missing.mkdir()
    command = [sys.executable, "-c", "import sys; from specserve.server.cli import main; sys.exit(main())",
               "serve", "--model", str(missing), "--draft", "none", "--port", str(free_port())]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SPECSERVE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("specserve: error: the model failed to load: "), proc.stderr
    assert "no-model-here" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_mounted_app_starts_its_worker_on_first_use(launch, make_engine):
    inner = create_app(make_engine(), ServerSettings(served_model_name="mounted"))
    outer = FastAPI()
    outer.mount("/llm", inner)
    try:
        with launch(outer) as server, server.http() as http:
            response = http.post("/llm/v1/chat/completions", json={
                "model": "mounted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert response.status_code == 200, response.text
            assert http.get("/llm/health").status_code == 200
    finally:
        inner.state.specserve.scheduler.stop()


def test_two_apps_in_one_process_keep_separate_metrics(launch, make_engine):
    first = create_app(make_engine(), ServerSettings(served_model_name="first"))
    second = create_app(make_engine(), ServerSettings(served_model_name="second"))
    with launch(first) as a, launch(second) as b:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
        assert httpx.post(f"{a.url}/v1/chat/completions", json=body).status_code == 200
        assert a.metric("vllm:request_success_total", model_name="first", finished_reason="length") + a.metric(
            "vllm:request_success_total", model_name="first", finished_reason="stop") == 1
        assert 'model_name="first"' not in httpx.get(f"{b.url}/metrics").text
        assert b.metric("vllm:prompt_tokens_total", model_name="second") == 0
