"""CI check of the README's server command: start `specserve serve` (built-in default model and
drafter), wait for /health, send one chat request with an image, check the reply, stop."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import time

import httpx
from PIL import Image

STARTUP_TIMEOUT_S = 900  # the first start pulls and assembles the default model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_data_url() -> str:
    buffer = io.BytesIO()
    image = Image.new("RGB", (64, 64), "white")
    image.paste((220, 30, 30), (16, 16, 48, 48))  # a red square
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wait_healthy(base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"server exited with code {server.returncode} before becoming healthy")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(2)
    sys.exit("server did not become healthy in time")


def main() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(["specserve", "serve", "--port", str(port)])
    try:
        wait_healthy(base, server)
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url()}},
            {"type": "text", "text": "What shape is in the image?"},
        ]
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 32, "temperature": 0}
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
        reply.raise_for_status()
        data = reply.json()
        text = data["choices"][0]["message"]["content"]
        print(f"serve smoke: model {data['model']!r} answered {text!r}; usage {data['usage']}")
        assert text.strip(), "empty answer"
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
