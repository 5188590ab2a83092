"""Image inputs: data-URL decoding with its limits (size, pixels before decoding, formats), remote
URLs (refused by default; with limits when allowed, against a loopback file server), and the
conversion of request messages to the engine's format."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from specserve.server.http import images
from specserve.server.http.errors import APIError
from specserve.server.http.images import (
    check_image_count,
    decode_data_url,
    engine_messages,
    fetch_image_bytes,
    load_image,
)
from specserve.server.http.protocol import ChatCompletionRequest
from specserve.server.http.settings import ServerSettings

PARAM = "messages[0].content[0].image_url.url"


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` but carries almost no pixel data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def refused(call, match: str = "") -> APIError:
    with pytest.raises(APIError) as info:
        call()
    assert info.value.status == 400 and info.value.param == PARAM
    assert match in info.value.message
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_decodes_common_formats_to_rgb(fmt):
    image = Image.new("RGB", (20, 10), (200, 30, 30))
    decoded = decode_data_url(data_url(encode(image, fmt)), 10**6, 10**6, PARAM)
    assert decoded.mode == "RGB" and decoded.size == (20, 10)


def test_palette_and_alpha_images_become_rgb():
    rgba = Image.new("RGBA", (8, 8), (0, 255, 0, 128))
    assert decode_data_url(data_url(encode(rgba)), 10**6, 10**6, PARAM).mode == "RGB"
    assert decode_data_url(data_url(encode(rgba.convert("P"))), 10**6, 10**6, PARAM).mode == "RGB"


def test_bad_payloads_are_400_naming_the_part():
    png = encode(Image.new("RGB", (4, 4)))
    refused(lambda: decode_data_url("data:image/png;base64,@@@not-base64@@@", 10**6, 10**6, PARAM), "base64")
    refused(lambda: decode_data_url(data_url(b"hello, not an image"), 10**6, 10**6, PARAM), "not an image")
    refused(lambda: decode_data_url(data_url(png, "text/plain"), 10**6, 10**6, PARAM), "not an image")
    refused(lambda: decode_data_url("data:image/png," + png.hex(), 10**6, 10**6, PARAM), "base64")
    refused(lambda: decode_data_url("data:image/png;base64", 10**6, 10**6, PARAM))
    refused(lambda: decode_data_url(data_url(png[: len(png) // 2]), 10**6, 10**6, PARAM))


def test_unsupported_format_is_refused():
    ppm = encode(Image.new("RGB", (4, 4)), "PPM")  # PIL reads it, this server does not
    refused(lambda: decode_data_url(data_url(ppm), 10**6, 10**6, PARAM), "not an image")


def test_wrapped_base64_lines_are_accepted():
    png = base64.encodebytes(encode(Image.new("RGB", (4, 4)))).decode()  # 76-column lines
    assert decode_data_url(f"data:image/png;base64,{png}", 10**6, 10**6, PARAM).size == (4, 4)


def test_size_limit_applies_before_decoding():
    png = encode(Image.new("RGB", (64, 64)))
    refused(lambda: decode_data_url(data_url(png), 16, 10**6, PARAM), "larger than")


def test_pixel_limit_applies_before_pixels_are_decoded():
    refused(lambda: decode_data_url(data_url(encode(Image.new("RGB", (100, 100)))), 10**6, 99 * 100, PARAM),
            "pixels")
    started = time.monotonic()
    # 400 megapixels claimed in a few hundred bytes: refused from the header (PIL's own bomb check)
    refused(lambda: decode_data_url(data_url(png_header_only(20_000, 20_000)), 10**6, 10**12, PARAM),
            "pixels")
    # a real bomb: 64 megapixels that compress to a few kilobytes
    bomb = encode(Image.new("1", (8000, 8000)))
    assert len(bomb) < 64 * 1024
    refused(lambda: decode_data_url(data_url(bomb), 10**6, 4096 * 4096, PARAM), "pixels")
    assert time.monotonic() - started < 5


def test_image_count_and_text_only_models():
    part = {"type": "image_url", "image_url": {"url": data_url(encode(Image.new("RGB", (4, 4))))}}
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [part, part, {"type": "text", "text": "?"}, part]}]})
    check_image_count(request.messages, ServerSettings(max_images=3), multimodal=True)
    with pytest.raises(APIError) as info:
        check_image_count(request.messages, ServerSettings(max_images=2), multimodal=True)
    assert info.value.param == "messages"
    with pytest.raises(APIError) as info:
        check_image_count(request.messages, ServerSettings(), multimodal=False)
    assert info.value.param == "messages[0].content[0]"


def test_engine_messages_format():
    part = {"type": "image_url", "image_url": data_url(encode(Image.new("RGB", (6, 5))))}  # bare string URL
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": [part, {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": None},
    ]})
    messages = asyncio.run(engine_messages(request.messages, ServerSettings()))
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert messages[1] == {"role": "user", "content": "a\nb"}
    image_part, text_part = messages[2]["content"]
    assert image_part["type"] == "image" and image_part["image"].size == (6, 5)
    assert text_part == {"type": "text", "text": "what is it?"}
    assert messages[3] == {"role": "assistant", "content": ""}


# ---- remote URLs, against a loopback file server ------------------------------------------------
PNG_BYTES = encode(Image.new("RGB", (12, 9), (1, 2, 3)))


REDIRECTS = {"/to-ok": "/ok.png", "/to-metadata": "http://169.254.169.254/latest/meta-data/",
             "/to-other-loopback": "http://127.0.0.2:{port}/ok.png", "/to-file": "file:///etc/passwd",
             "/loop": "/loop"}


class _Files(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path in REDIRECTS:
            self.send_response(302)
            self.send_header("Location", REDIRECTS[self.path].format(port=self.server.server_address[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/slow.png":
            time.sleep(1.5)
        body = {"/ok.png": PNG_BYTES, "/slow.png": PNG_BYTES, "/big.png": PNG_BYTES * 40}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
            pass

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture(scope="module")
def file_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_urls_are_refused_by_default(file_server):
    settings = ServerSettings()
    error = refused(lambda: asyncio.run(load_image(f"{file_server}/ok.png", settings, PARAM)), "data URL")
    assert "disabled" in error.message
    refused(lambda: asyncio.run(load_image("file:///etc/passwd", settings, PARAM)))
    refused(lambda: asyncio.run(load_image("ftp://example.invalid/x.png", settings, PARAM)))


def test_remote_urls_when_allowed_have_size_and_time_limits(file_server):
    # the file server is on loopback: private hosts allowed here (the SSRF tests below refuse them)
    settings = ServerSettings(allow_remote_images=True, allow_private_image_hosts=True,
                              max_image_bytes=len(PNG_BYTES) * 2, remote_image_timeout_s=0.5)
    image = asyncio.run(load_image(f"{file_server}/ok.png", settings, PARAM))
    assert image.size == (12, 9)
    refused(lambda: asyncio.run(fetch_image_bytes(f"{file_server}/big.png", settings, PARAM)), "larger than")
    refused(lambda: asyncio.run(fetch_image_bytes(f"{file_server}/missing.png", settings, PARAM)), "404")
    refused(lambda: asyncio.run(fetch_image_bytes(f"{file_server}/slow.png", settings, PARAM)), "longer than")
    refused(lambda: asyncio.run(fetch_image_bytes("http://[::bad", settings, PARAM)), "could not fetch")


# ---- SSRF: only public addresses, at every hop -----------------------------------------------------
def test_private_hosts_are_refused_by_name_and_by_address(file_server):
    settings = ServerSettings(allow_remote_images=True)
    port = file_server.rsplit(":", 1)[1]
    for url in (f"{file_server}/ok.png", f"http://localhost:{port}/ok.png", "http://[::1]:9/x.png",
                "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png"):
        error = refused(lambda: asyncio.run(fetch_image_bytes(url, settings, PARAM)), "non-public address")
        assert "public addresses only" in error.message


@pytest.fixture
def loopback_is_public(monkeypatch):
    """The file server's own address (127.0.0.1) counts as public, and nothing else private does: a
    redirect's second hop then meets the real check, as it would after a public first hop."""
    real = images.is_public
    monkeypatch.setattr(images, "is_public", lambda address: str(address) == "127.0.0.1" or real(address))


def test_every_redirect_hop_is_checked(file_server, loopback_is_public):
    settings = ServerSettings(allow_remote_images=True)
    assert asyncio.run(fetch_image_bytes(f"{file_server}/to-ok", settings, PARAM)) == PNG_BYTES
    for path, address in (("/to-metadata", "169.254.169.254"), ("/to-other-loopback", "127.0.0.2")):
        error = refused(lambda: asyncio.run(fetch_image_bytes(f"{file_server}{path}", settings, PARAM)),
                        "non-public address")
        assert address in error.message
    refused(lambda: asyncio.run(fetch_image_bytes(f"{file_server}/to-file", settings, PARAM)), "http or https")
    refused(lambda: asyncio.run(fetch_image_bytes(f"{file_server}/loop", settings, PARAM)), "more than 3 redirects")


def test_a_host_that_does_not_resolve_is_a_clear_400():
    settings = ServerSettings(allow_remote_images=True)
    refused(lambda: asyncio.run(fetch_image_bytes("http://no-such-host.invalid/x.png", settings, PARAM)),
            "could not resolve")
