"""Images end to end on the tiny LLaVA: base64 images reach the model (greedy output equals the
engine's own), and every bad image is a 400 naming its content part while the server keeps going."""

from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from PIL import Image

from specserve.server.engine.config import SamplingParams
from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

SETTINGS = ServerSettings(max_images=2, max_image_pixels=256 * 256, max_body_bytes=1024 * 1024)


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(*urls: str, text: str = "what is in the picture?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server(launch, make_engine):
    with launch(create_app(make_engine("llava"), SETTINGS)) as running:
        yield running


@pytest.fixture(scope="module")
def reference(make_engine):
    return make_engine("llava")


PICTURE = Image.new("RGB", (40, 30), (220, 20, 60))


def test_base64_image_greedy_equals_engine_generate(server, reference, openai_schema):
    client = server.openai()
    expected = reference.generate(
        reference.prepare_chat([{"role": "user", "content": [
            {"type": "image", "image": PICTURE}, {"type": "text", "text": "what is in the picture?"}]}]),
        SamplingParams(max_tokens=12))
    response = client.chat.completions.create(
        model=server.state.model_name, messages=image_message(png_url(PICTURE)), max_tokens=12, temperature=0)
    openai_schema("CreateChatCompletionResponse", response.model_dump(mode="json", exclude_unset=True))
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == expected.prompt_tokens
    text_only = client.chat.completions.create(
        model=server.state.model_name, messages=[{"role": "user", "content": "what is in the picture?"}],
        max_tokens=1, temperature=0)
    assert response.usage.prompt_tokens > text_only.usage.prompt_tokens  # the image's tokens
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=server.state.model_name, messages=image_message(png_url(PICTURE)), max_tokens=12,
            temperature=0, stream=True) if c.choices)
    assert streamed == expected.text


def test_two_images_are_accepted(server):
    response = server.openai().chat.completions.create(
        model=server.state.model_name, messages=image_message(png_url(PICTURE), png_url(PICTURE.rotate(90))),
        max_tokens=3, temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length")


def bomb_url() -> str:
    return png_url(Image.new("1", (8000, 8000)))  # 64 megapixels in a few kilobytes


BAD_IMAGES = {
    "invalid base64": ("data:image/png;base64,***", "messages[0].content[0].image_url.url"),
    "not an image": ("data:image/png;base64," + base64.b64encode(b"plain text").decode(),
                     "messages[0].content[0].image_url.url"),
    "decompression bomb": (None, "messages[0].content[0].image_url.url"),
    "too many pixels": (png_url(Image.new("RGB", (300, 300))), "messages[0].content[0].image_url.url"),
    "remote url refused": ("http://127.0.0.1:9/cat.png", "messages[0].content[0].image_url.url"),
    "other scheme": ("file:///etc/hostname", "messages[0].content[0].image_url.url"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_are_400(server, case, openai_schema):
    url, param = BAD_IMAGES[case]
    body = {"model": server.state.model_name, "messages": image_message(url or bomb_url()), "max_tokens": 2}
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    openai_schema("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == param


def test_too_many_images_is_400(server):
    url = png_url(PICTURE)
    body = {"model": server.state.model_name, "messages": image_message(url, url, url), "max_tokens": 2}
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
        # and it still serves
        ok = http.post("/v1/chat/completions", json={**body, "messages": image_message(url)})
    assert ok.status_code == 200


def test_remote_image_when_the_server_allows_it(launch, make_engine, reference):
    """With allow_remote_images, an http URL (here a loopback file server) works like inline data."""
    png = io.BytesIO()
    PICTURE.save(png, format="PNG")

    class OnePicture(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Length", str(len(png.getvalue())))
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *args):
            pass

    files = ThreadingHTTPServer(("127.0.0.1", 0), OnePicture)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}/picture.png"
    # the picture is on loopback: private hosts allowed here; without that, the server refuses it
    settings = ServerSettings(allow_remote_images=True, allow_private_image_hosts=True, remote_image_timeout_s=5)
    try:
        with launch(create_app(make_engine("llava"), settings)) as server:
            remote = server.openai().chat.completions.create(
                model=server.state.model_name, messages=image_message(url), max_tokens=8, temperature=0)
        public_only = ServerSettings(allow_remote_images=True, remote_image_timeout_s=5)
        with launch(create_app(make_engine("llava"), public_only)) as server:
            with pytest.raises(openai.BadRequestError, match="public addresses only"):
                server.openai().chat.completions.create(
                    model=server.state.model_name, messages=image_message(url), max_tokens=8)
    finally:
        files.shutdown()
        files.server_close()
    expected = reference.generate(
        reference.prepare_chat([{"role": "user", "content": [
            {"type": "image", "image": PICTURE}, {"type": "text", "text": "what is in the picture?"}]}]),
        SamplingParams(max_tokens=8))
    assert remote.choices[0].message.content == expected.text
