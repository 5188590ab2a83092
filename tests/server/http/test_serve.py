"""The command-line entry (`add_serve_arguments`, `run_serve`) and embedding: the app factory
mounted inside another FastAPI app, and several apps in one process."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig
from specserve.server.http import serve
from specserve.server.http.app import create_app
from specserve.server.http.serve import (
    add_serve_arguments,
    default_threads,
    engine_factory,
    listen_from_args,
    run_serve,
    settings_from_args,
)
from specserve.server.http.settings import ListenSettings, ServerSettings


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
    assert settings == ServerSettings(served_model_name=("tiny",), max_active=3, max_queue=5, max_n=2, max_images=1,
                                      allow_remote_images=True, remote_image_timeout_s=2.5)
    assert settings_from_args(parse()) == ServerSettings()


def test_limit_arguments_become_settings():
    args = parse("--max-prompt-chars", "1000", "--body-timeout", "7", "--prepare-workers", "3",
                 "--header-timeout", "4", "--keep-alive-timeout", "2", "--limit-concurrency", "50",
                 "--shutdown-timeout", "9", "--threads", "3", "--port", "9002", "--log-level", "warning")
    settings = settings_from_args(args)
    assert (settings.max_prompt_chars, settings.body_timeout_s, settings.prepare_workers) == (1000, 7.0, 3)
    assert listen_from_args(args) == ListenSettings(port=9002, log_level="warning", header_timeout_s=4.0,
                                                   keep_alive_timeout_s=2, limit_concurrency=50,
                                                   shutdown_timeout_s=9.0)
    assert args.threads == 3
    assert listen_from_args(parse()) == ListenSettings()


def test_default_threads_leave_the_event_loop_a_core(monkeypatch):
    """Finding 6 of issue 14: on 2 shared cores, torch's default 2 threads made each step ~40x slower."""
    cases = [(2, 2, 1), (1, 1, 1), (8, 4, 4), (4, 4, 3), (64, 32, 32)]  # (cpus, torch's default, threads)
    for cpus, torch_default, expected in cases:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)), raising=False)
        monkeypatch.setattr(torch, "get_num_threads", lambda n=torch_default: n)
        assert default_threads() == expected


def test_threads_are_set_on_the_worker_before_the_model_loads(monkeypatch):
    seen = {}

    def from_config(config):
        seen.update(threads=torch.get_num_threads(), thread=threading.current_thread().name)
        return "engine"

    monkeypatch.setattr(Engine, "from_config", staticmethod(from_config))
    worker = threading.Thread(target=lambda: seen.update(engine=engine_factory(EngineConfig("m"), 3)()),
                              name="specserve-worker")
    try:
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(1)  # torch's count is process-wide: back to the suite's (conftest)
    assert seen == {"threads": 3, "thread": "specserve-worker", "engine": "engine"}


def test_a_signal_that_uvicorn_re_raises_after_draining_does_not_kill_the_command():
    """uvicorn re-raises SIGTERM once its graceful shutdown is done; `run_serve` then exits 0."""
    before = signal.getsignal(signal.SIGTERM)
    with serve._signals_end_quietly():
        signal.raise_signal(signal.SIGTERM)  # the default action would end this process here
    assert signal.getsignal(signal.SIGTERM) is before


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_active"):
        ServerSettings(max_active=0)
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServerSettings(default_max_tokens=0)
    with pytest.raises(ValueError, match="body_timeout_s"):
        ServerSettings(body_timeout_s=0)
    with pytest.raises(ValueError, match="limit_concurrency"):
        ListenSettings(limit_concurrency=0)
    with pytest.raises(ValueError, match="header_timeout_s"):
        ListenSettings(header_timeout_s=0)


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


def test_every_flag_takes_its_default_from_the_environment(monkeypatch):
    env = {"SPECSERVE_MODEL": "m-from-env", "SPECSERVE_MAX_ACTIVE": "3", "SPECSERVE_ALLOW_REMOTE_IMAGES": "yes",
           "SPECSERVE_PREPACK_WEIGHTS": "false", "SPECSERVE_ALLOWED_ORIGINS": "http://a.example, http://b.example",
           "SPECSERVE_LOG_FORMAT": "json", "SPECSERVE_SSE_KEEPALIVE": "2.5", "SPECSERVE_SERVED_MODEL_NAME": "x y"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = parse()
    settings = settings_from_args(args)
    assert (args.model, args.prepack_weights, args.log_format) == ("m-from-env", False, "json")
    assert (settings.max_active, settings.allow_remote_images, settings.sse_keepalive_s) == (3, True, 2.5)
    assert settings.allowed_origins == ("http://a.example", "http://b.example")
    assert settings.served_model_names == ("x", "y")
    assert settings_from_args(parse("--max-active", "5")).max_active == 5  # the command line wins


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("SPECSERVE_MAX_ACTIVE", "three", "invalid literal"),
    ("SPECSERVE_ALLOW_REMOTE_IMAGES", "maybe", "not one of"),
    ("SPECSERVE_LOG_FORMAT", "xml", "not one of plain, json"),
])
def test_a_bad_environment_value_names_its_variable(monkeypatch, capsys, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit):
        parse()
    err = capsys.readouterr().err
    assert f"${variable}='{value}'" in err and message in err


def test_served_model_names_are_all_accepted_and_listed(launch, make_engine):
    settings = ServerSettings(served_model_name=("main", "alias"))
    with launch(create_app(make_engine(), settings)) as server, server.http() as client:
        listed = [card["id"] for card in client.get("/v1/models").json()["data"]]
        alias = server.openai().completions.create(model="alias", prompt="hi", max_tokens=2)
        unknown = client.post("/v1/completions", json={"model": "other", "prompt": "hi", "max_tokens": 2})
        card = client.get("/v1/models/alias").json()
    assert listed == ["main", "alias"] and alias.model == "main" and card["id"] == "alias"
    assert unknown.status_code == 404 and "'main', 'alias'" in unknown.json()["error"]["message"]
    with pytest.raises(ValueError, match="must not be empty"):
        ServerSettings(served_model_name=("main", ""))
