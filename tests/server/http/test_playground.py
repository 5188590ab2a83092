"""The playground and what it needs from the API, over a real socket: the page at / (404 with
--no-ui, open when the API needs a key), `return_token_origins` on stream chunks, `speculative:
false`, and the page itself in Chromium (Debian's, driven by Playwright) on the tiny LLaVA with an
n-gram drafter, which accepts drafts on this image prompt."""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil

import pytest
from PIL import Image

from specserve.server.http.app import create_app
from specserve.server.http.serve import add_serve_arguments, settings_from_args
from specserve.server.http.settings import ServerSettings

PROMPT = "Repeat: a red circle, a blue square. a red circle, a blue square."
PICTURE = Image.new("RGB", (40, 30), (220, 20, 60))


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": PROMPT}]}]


@pytest.fixture(scope="module")
def server(launch, make_engine):
    # batch_tree_tokens=0: every proposal verified whole (the planner's timing cannot switch drafting off)
    with launch(create_app(make_engine("llava", batch_tree_tokens=0))) as running:
        yield running


def stream_chunks(server, path: str, body: dict, sse_payloads) -> list[dict]:
    with server.http() as http, http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def chat_body(server, **extra) -> dict:
    return {"model": server.state.model_name, "messages": image_message(png_url(PICTURE)),
            "max_tokens": 40, "temperature": 0, "stream": True, **extra}


def assert_origins_explain_the_stream(chunks: list[dict], content_of) -> list[int]:
    """Each chunk's origin texts join to its content; the first chunk is prefill's token (depth 0),
    every later one a verify step: drafts at depths 1..k, then the target's bonus token (the last
    step may be cut by max_tokens or EOS). Returns every token's depth."""
    steps = [c["choices"][0] for c in chunks if c["choices"]]
    for choice in steps:
        assert "".join(o["text"] for o in choice["token_origins"]) == content_of(choice)
    depths = [[o["depth"] for o in choice["token_origins"]] for choice in steps]
    assert depths[0] == [0]
    for step in depths[1:-1]:
        assert step == list(range(1, len(step))) + [0]
    last = depths[-1]  # ends with the bonus, or was cut after a draft (max_tokens, EOS)
    assert len(depths) > 1 and last in (list(range(1, len(last))) + [0], list(range(1, len(last) + 1)))
    spec = chunks[-1]["spec_decode"] if chunks[-1]["choices"] else chunks[-2]["spec_decode"]
    assert spec["verify_steps"] == len(depths) - 1  # with origins, a step whose text is held back is sent too
    flat = [d for step in depths for d in step]
    accepted = sum(d > 0 for d in flat)
    if flat[-1] == 0:  # the last step was not cut: every accepted draft was emitted
        assert accepted == spec["accepted_draft_tokens"]
    else:
        assert accepted <= spec["accepted_draft_tokens"]
    return flat


# ---- the page -----------------------------------------------------------------------------------
def test_the_page_and_its_files_are_served(server):
    with server.http() as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for name, media_type in [("playground.js", "javascript"), ("playground.css", "text/css")]:
            assert f"/static/{name}" in page.text
            file = http.get(f"/static/{name}")
            assert file.status_code == 200 and media_type in file.headers["content-type"]
        assert http.get("/static/nothing.js").status_code == 404


def test_no_ui_serves_no_page(launch, make_engine):
    args = argparse.ArgumentParser()
    add_serve_arguments(args)
    assert settings_from_args(args.parse_args(["--no-ui"])).ui is False
    assert settings_from_args(args.parse_args([])).ui is True
    with launch(create_app(make_engine(), ServerSettings(ui=False))) as running, running.http() as http:
        assert http.get("/").status_code == 404
        assert http.get("/static/playground.js").status_code == 404
        assert http.get("/health").status_code == 200


def test_no_ui_reads_its_environment_variable(monkeypatch):
    monkeypatch.setenv("SPECSERVE_NO_UI", "1")
    args = argparse.ArgumentParser()
    add_serve_arguments(args)
    assert settings_from_args(args.parse_args([])).ui is False


def test_the_page_is_open_when_the_api_needs_a_key(launch, make_engine):
    with launch(create_app(make_engine(), ServerSettings(api_key="k3y"))) as running, running.http() as http:
        assert http.get("/").status_code == 200 and http.get("/static/playground.js").status_code == 200
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200


# ---- the API fields it uses -----------------------------------------------------------------------
def test_token_origins_explain_a_chat_stream(server, sse_payloads, openai_schema):
    chunks = stream_chunks(server, "/v1/chat/completions", chat_body(server, return_token_origins=True),
                           sse_payloads)
    for chunk in chunks:
        openai_schema("CreateChatCompletionStreamResponse", chunk)  # an extra field: OpenAI clients ignore it
    depths = assert_origins_explain_the_stream(chunks, lambda choice: choice["delta"].get("content", ""))
    assert max(depths) >= 1  # this prompt makes the n-gram drafter's tokens accepted
    plain = stream_chunks(server, "/v1/chat/completions", chat_body(server), sse_payloads)
    assert all("token_origins" not in c["choices"][0] for c in plain)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in plain) == \
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_the_openai_client_reads_token_origins_as_an_extra(server):
    stream = server.openai().chat.completions.create(
        model=server.state.model_name, messages=image_message(png_url(PICTURE)), max_tokens=20, temperature=0,
        stream=True, extra_body={"return_token_origins": True})
    choices = [chunk.choices[0] for chunk in stream if chunk.choices]
    for choice in choices:
        assert "".join(o["text"] for o in choice.model_extra["token_origins"]) == (choice.delta.content or "")
    assert sum(len(choice.model_extra["token_origins"]) for choice in choices) == 20


def test_token_origins_explain_a_completion_stream(server, sse_payloads):
    body = {"model": server.state.model_name, "prompt": PROMPT * 2, "max_tokens": 30, "temperature": 0,
            "stream": True, "return_token_origins": True, "stream_options": {"include_usage": True}}
    chunks = stream_chunks(server, "/v1/completions", body, sse_payloads)
    depths = assert_origins_explain_the_stream(chunks, lambda choice: choice["text"])
    assert len(depths) == chunks[-1]["usage"]["completion_tokens"]


def test_a_request_without_drafting_gives_the_same_text_and_no_drafts(server, sse_payloads):
    def run(speculative: bool) -> tuple[str, dict, list[int]]:
        chunks = stream_chunks(server, "/v1/chat/completions",
                               chat_body(server, speculative=speculative, return_token_origins=True), sse_payloads)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        depths = [o["depth"] for c in chunks for o in c["choices"][0]["token_origins"]]
        return text, chunks[-1]["spec_decode"], depths

    on_text, on_spec, on_depths = run(True)
    off_text, off_spec, off_depths = run(False)
    assert on_text == off_text and len(on_depths) == len(off_depths)
    assert on_spec["accepted_draft_tokens"] > 0 and max(on_depths) > 0
    assert off_spec["accepted_draft_tokens"] == off_spec["proposed_draft_tokens"] == 0 and set(off_depths) == {0}
    assert off_spec["verify_steps"] == len(off_depths) - 1


@pytest.mark.parametrize(("field", "value"), [
    ("return_token_origins", "yes"), ("return_token_origins", 1), ("speculative", "false"), ("speculative", 0),
])
def test_bad_types_are_400_naming_the_field(server, field, value, openai_schema):
    for path, body in [("/v1/chat/completions", chat_body(server)),
                       ("/v1/completions", {"prompt": "hi", "model": server.state.model_name})]:
        with server.http() as http:
            response = http.post(path, json={**body, field: value})
        assert response.status_code == 400, response.text
        openai_schema("ErrorResponse", response.json())
        assert response.json()["error"]["param"] == field


# ---- the page in a browser --------------------------------------------------------------------------
def chromium_page():
    """A headless Chromium page (Debian's browser, driven by Playwright), or a skip saying what is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    return sync_api.sync_playwright(), executable


@pytest.mark.browser
def test_the_page_streams_an_image_answer_with_drafted_tokens_marked(server, tmp_path):
    playwright, executable = chromium_page()
    image = tmp_path / "shape.png"
    PICTURE.save(image)
    with playwright as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/")
            page.wait_for_function("name => document.getElementById('model').textContent === 'model: ' + name",
                                   arg=server.state.model_name)
            page.set_input_files("#image", str(image))
            page.fill("#prompt", PROMPT)
            page.fill("#max-tokens", "40")
            page.check("#compare")
            page.click("#send")
            page.wait_for_selector("#panel-on[data-state=done]", timeout=60_000)
            page.wait_for_selector("#panel-off[data-state=done]", timeout=60_000)
            on, off = (page.eval_on_selector(f"#panel-{side} .output", "e => e.textContent") for side in ("on", "off"))
            drafted = page.locator("#panel-on .output span:not([data-depth='0'])").count()
            off_drafted = page.locator("#panel-off .output span:not([data-depth='0'])").count()
            stats = page.inner_text("#panel-on .stats")
            assert page.locator("#preview").is_visible()
        finally:
            browser.close()
    assert not errors
    with server.http() as http:  # the answer the API gives for the same image and prompt
        expected = http.post("/v1/chat/completions", json={
            "model": server.state.model_name, "messages": image_message(png_url(PICTURE)),
            "max_tokens": 40, "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert expected.strip() and on == off == expected
    assert drafted >= 1 and off_drafted == 0
    assert "tok/s" in stats and "mean accepted length" in stats
