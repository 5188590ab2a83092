"""Fixtures of the HTTP tests: real uvicorn servers on loopback, engines on the tiny models, and
OpenAI's published OpenAPI schemas turned into JSON-Schema validators.

The OpenAPI spec is the copy that the `llm-comply` package ships (MIT, as OpenAI's spec itself);
it is read from the installed package, not copied here.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from importlib import resources

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig


# ---- servers ---------------------------------------------------------------------------------
@dataclass
class RunningServer:
    """A live server: its app, base URL, and clients for it."""

    app: FastAPI
    url: str
    client: httpx.Client | None = None  # a shared keep-alive client, for modules that want one

    @property
    def state(self):
        return self.app.state.specserve

    def openai(self, **kwargs) -> openai.OpenAI:
        # No retries: a test must see the first answer (429 and 5xx would otherwise be retried).
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             timeout=kwargs.pop("timeout", 60), **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0.0 if absent)."""
        text = httpx.get(f"{self.url}/metrics").text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0


@contextmanager
def run_server(app: FastAPI, server: uvicorn.Server | None = None) -> Iterator[RunningServer]:
    """Serve `app` with uvicorn on a free loopback port, in a thread; stop it on exit. `server`: a
    server built for `app` (`specserve serve`'s, with its limits) instead of uvicorn's plain one."""
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto says TCP, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = server or uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(app, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="session")
def launch() -> Callable[[FastAPI], AbstractContextManager[RunningServer]]:
    """`with launch(app) as server:` runs a real server for a module-scoped fixture (`launch(app,
    server)`: with a server built for it)."""
    return run_server


@pytest.fixture(scope="session")
def make_engine(tiny_model_dirs) -> Callable[..., Engine]:
    """`make_engine(family="llama", draft="ngram")`: a fresh engine on a tiny model (each server
    needs its own: an engine is driven by one thread)."""

    def make(family: str = "llama", draft: str = "ngram", **config) -> Engine:
        return Engine.from_config(EngineConfig(model=str(tiny_model_dirs[family]), draft=draft, **config))

    return make


# ---- OpenAI's OpenAPI schemas as JSON Schema ---------------------------------------------------
def openapi_to_json_schema(node):
    """OpenAPI 3.0 schema -> JSON Schema 2020-12: `nullable: true` becomes `anyOf [schema, null]`
    (which also admits null past an `enum`), boolean `exclusiveMinimum/Maximum` become numeric,
    and `#/components/schemas/X` refs point to `#/$defs/X`."""
    if isinstance(node, list):
        return [openapi_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: openapi_to_json_schema(value) for key, value in node.items() if key != "nullable"}
    if isinstance(out.get("$ref"), str):
        out["$ref"] = out["$ref"].replace("#/components/schemas/", "#/$defs/")
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if out.get(exclusive) is True and bound in out:
            out[exclusive] = out.pop(bound)
        elif out.get(exclusive) is False:
            out.pop(exclusive)
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@pytest.fixture(scope="session")
def openai_spec() -> dict:
    text = resources.files("llm_comply.specs").joinpath("openai_chat.json").read_text(encoding="utf-8")
    return json.loads(text)


@pytest.fixture(scope="session")
def openai_schema(openai_spec) -> Callable[[str, object], None]:
    """`openai_schema("CreateChatCompletionResponse", body)` raises if `body` breaks the schema."""
    import jsonschema

    defs = openapi_to_json_schema(copy.deepcopy(openai_spec["components"]["schemas"]))
    validators: dict[str, jsonschema.Draft202012Validator] = {}

    def validate(name: str, instance: object) -> None:
        if name not in validators:
            schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": defs,
                      "$ref": f"#/$defs/{name}"}
            validators[name] = jsonschema.Draft202012Validator(schema)
        validators[name].validate(instance)

    return validate


@pytest.fixture(scope="session")
def to_json_schema() -> Callable:
    return openapi_to_json_schema


# ---- raw SSE -----------------------------------------------------------------------------------
def read_sse(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an event stream, checking that nothing else is in it."""
    payloads = []
    for block in response.read().decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: ") and "\n" not in block, f"not a single data line: {block!r}"
        payloads.append(block[len("data: "):])
    return payloads


@pytest.fixture(scope="session")
def sse_payloads() -> Callable[[httpx.Response], list[str]]:
    return read_sse
