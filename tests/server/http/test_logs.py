"""Logs over a real socket: one access line per API request (with its id, counts, TTFT and
acceptance, never its text), a stats line while busy and none while idle, plain or JSON lines."""

from __future__ import annotations

import argparse
import json
import logging
import time

import pytest

from specserve.server.engine.metrics import SpecMetrics
from specserve.server.http import logs
from specserve.server.http.app import create_app
from specserve.server.http.serve import add_serve_arguments, settings_from_args
from specserve.server.http.settings import ServerSettings

SECRET = "zebra-marker-4711"  # prompt text that must never reach a log line
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": f"say {SECRET} {SECRET}"}], "max_tokens": 8}


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured():
    """Records of `specserve.access` and `specserve.stats`, whatever handlers the process has."""
    handler = Collect()
    loggers = [logging.getLogger(name) for name in ("specserve.access", "specserve.stats")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler.records
    for logger, level in zip(loggers, levels):
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def server(launch, make_engine):
    settings = ServerSettings(served_model_name="tiny", log_stats_interval_s=0.2)
    with launch(create_app(make_engine(), settings)) as running:
        yield running


def access_lines(records, request_id: str, wait: float = 5.0) -> list[dict]:
    """The request's access lines, waiting up to `wait` seconds for the first: the line is written once
    the response has gone, which the server thread may do just after the client has read it."""
    deadline = time.monotonic() + wait
    while True:
        lines = [r.fields for r in records if r.name == "specserve.access" and r.fields["request_id"] == request_id]
        if lines or time.monotonic() >= deadline:
            return lines
        time.sleep(0.02)


def test_each_request_gets_one_access_line_with_counts_and_no_text(server, captured):
    with server.http() as client:
        plain = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "plain-1"})
        with client.stream("POST", "/v1/chat/completions", headers={"X-Request-Id": "stream-1"},
                           json={**CHAT, "stream": True}) as streamed:
            streamed.read()
        client.get("/health", headers={"X-Request-Id": "health-1"})
    assert plain.status_code == 200 and streamed.status_code == 200
    [line] = access_lines(captured, "plain-1")
    usage = plain.json()["usage"]
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions", 200)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert 0 <= line["ttft_ms"] <= line["duration_ms"]
    spec = plain.json()["spec_decode"]
    assert line["mean_accepted_length"] == (round(spec["mean_accepted_length"], 2) if spec["verify_steps"] else None)
    [stream_line] = access_lines(captured, "stream-1")
    assert stream_line["status"] == 200 and stream_line["completion_tokens"] >= 1
    assert access_lines(captured, "health-1", wait=0.5) == []  # probes are not logged
    formatted = [logging.Formatter().format(r) + str(getattr(r, "fields", "")) for r in captured]
    assert not any(SECRET in text for text in formatted)


def test_a_refused_request_is_logged_with_its_status_only(server, captured):
    with server.http() as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": -1},
                               headers={"X-Request-Id": "bad-1"})
    assert response.status_code == 400
    [line] = access_lines(captured, "bad-1")
    assert line["status"] == 400 and "completion_tokens" not in line


def test_a_stats_line_comes_while_busy_and_none_while_idle(server, captured):
    with server.http() as client:
        client.post("/v1/chat/completions", json=CHAT)
    deadline = time.monotonic() + 5
    while not [r for r in captured if r.name == "specserve.stats"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = [r.fields for r in captured if r.name == "specserve.stats"]
    assert stats and stats[0]["generation_tokens_per_s"] > 0 and stats[0]["finished"] >= 1
    assert {"running", "waiting", "kv_cache_usage", "mean_accepted_length", "draft_acceptance_rate"} <= set(stats[0])
    time.sleep(0.5)  # idle for two intervals: the line after the busy one is the last
    count = len([r for r in captured if r.name == "specserve.stats"])
    time.sleep(0.5)
    assert len([r for r in captured if r.name == "specserve.stats"]) == count


def test_the_stats_of_an_interval():
    running = [2]
    stats = logs.StatsLog(10, running=lambda: running[0], waiting=lambda: 1, kv_usage=lambda: 0.25)
    delta = SpecMetrics()
    for accepted in (3, 1, 2, 0):
        delta.observe(num_proposed=4, num_accepted=accepted)
    stats.on_step(delta)
    fields = stats.take(stats._since + 2.0)
    # 4 verify steps emit 4 bonus tokens + 6 accepted drafts = 10 tokens in 2 s
    assert fields["generation_tokens_per_s"] == 5.0 and fields["mean_accepted_length"] == 2.5
    assert fields["draft_acceptance_rate"] == "37.5%" and fields["per_position_acceptance"] == "0.75,0.50,0.25"
    assert (fields["running"], fields["waiting"], fields["kv_cache_usage"]) == (2, 1, "25.0%")
    assert stats.take(stats._since + 2.0)["generation_tokens_per_s"] == 0.0  # still running: a line
    running[0] = 0
    stats_idle = logs.StatsLog(10, running=lambda: 0, waiting=lambda: 0, kv_usage=lambda: 0.0)
    assert stats_idle.take(stats_idle._since + 1.0) is None


def test_json_and_plain_lines():
    record = logging.LogRecord("specserve.access", logging.INFO, __file__, 1, "POST %s %d",
                               ("/v1/completions", 200), None)
    record.fields = {"request_id": "r1", "status": 200}
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == "POST /v1/completions 200" and entry["request_id"] == "r1"
    assert entry["level"] == "INFO" and entry["logger"] == "specserve.access"
    assert logs.PlainFormatter().format(record).endswith("specserve.access: POST /v1/completions 200 request_id=r1 "
                                                        "status=200")


def test_configure_sends_specserve_and_uvicorn_lines_through_one_handler():
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in ("specserve", "uvicorn")}
    try:
        logs.configure("warning", "json")
        for name in ("specserve", "uvicorn"):
            logger = logging.getLogger(name)
            assert [type(h.formatter) for h in logger.handlers] == [logs.JsonFormatter]
            assert logger.level == logging.WARNING and not logger.propagate
        with pytest.raises(ValueError, match="log format must be one of"):
            logs.configure("info", "xml")
    finally:
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def test_the_flags_reach_the_settings():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--log-format", "json", "--log-stats-interval", "3"])
    assert args.log_format == "json" and settings_from_args(args).log_stats_interval_s == 3.0
    assert settings_from_args(parser.parse_args([])).log_stats_interval_s == ServerSettings().log_stats_interval_s
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-format", "xml"])
    with pytest.raises(ValueError, match="log_stats_interval_s must be >= 0"):
        ServerSettings(log_stats_interval_s=-1)
