"""Images of chat requests: `data:` URLs (base64), and http(s) URLs when the settings allow them.

Every failure is the client's: a 400 naming the content part. Limits are checked as early as the
data allows: the number of images before anything is decoded, the encoded size before base64
decoding (or while downloading), and width x height from the image header before pixels are decoded,
so a decompression bomb (a small file that inflates to gigapixels) is refused without being inflated;
the engine's own size check (`SizeCheck`: aspect ratio, pixels once its processor resizes) also runs
on the header. A remote fetch (`--allow-remote-images`) goes only to public addresses: every hop's
host is resolved here, each address checked (no private, loopback, link-local, multicast or reserved
ones, unless `--allow-private-image-hosts`), and the connection made to the checked address, so a
redirect or a DNS answer that changes between check and connect cannot reach an internal service.
Only common raster formats are opened: PIL's other plugins (EPS runs Ghostscript, for
one) are more attack surface than a chat request needs. Decoding runs in a thread (`Blocking`: the
app's prepare pool), off the event loop and off the engine's worker.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from PIL import Image

from ..engine.errors import RequestError
from .errors import bad_request
from .protocol import ChatMessage, ImagePart
from .settings import ServerSettings

SizeCheck = Callable[[int, int], None]  # (width, height); raises RequestError (`Engine.check_image_size`)
Blocking = Callable[..., Awaitable[Any]]  # `await run(fn, *args)` runs fn(*args) in a thread

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_REDIRECTS = 3
DEFAULT_PORTS = {"http": 80, "https": 443}
_DATA_URL = re.compile(r"data:(?P<mime>[^,;]*)(?P<params>(?:;[^,;]*)*),(?P<data>.*)", re.DOTALL)
_ROLES = {"developer": "system"}  # HF chat templates know "system", not OpenAI's newer "developer"


def decode_image(data: bytes, max_pixels: int, param: str, check: SizeCheck | None = None) -> Image.Image:
    """Bytes of an image file -> an RGB PIL image, refusing non-images and oversized images."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError:
        raise bad_request("the image has too many pixels", param) from None
    except Exception:  # any failure to parse client bytes is a client error (PIL raises many kinds)
        raise bad_request(f"the data is not an image in a supported format ({', '.join(FORMATS)})",
                          param) from None
    width, height = image.size
    if width * height > max_pixels:
        raise bad_request(f"the image is {width}x{height} pixels, more than this server's limit of "
                          f"{max_pixels} pixels", param)
    if check is not None:
        try:
            check(width, height)
        except RequestError as exc:
            raise bad_request(exc.message, param) from None
    try:
        image.load()  # decodes the pixels (the first frame of an animation)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # PIL's documented route for palette transparency
        return image.convert("RGB")
    except Exception:  # truncated or corrupt pixel data
        raise bad_request("the image data is corrupt or truncated", param) from None


def decode_data_url(
    url: str, max_bytes: int, max_pixels: int, param: str, check: SizeCheck | None = None,
) -> Image.Image:
    """`data:image/png;base64,...` -> an RGB PIL image."""
    match = _DATA_URL.fullmatch(url)
    if match is None or ";base64" not in match["params"].lower():
        raise bad_request("an image data URL must look like data:image/<format>;base64,<data>", param)
    mime = match["mime"].strip().lower()
    if mime and not mime.startswith("image/"):
        raise bad_request(f"the data URL's media type is {mime!r}, not an image", param)
    payload = "".join(match["data"].split())  # some encoders wrap base64 lines
    if len(payload) // 4 * 3 > max_bytes:
        raise bad_request(f"the image is larger than this server's limit of {max_bytes} bytes", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the image data URL is not valid base64", param) from None
    return decode_image(data, max_pixels, param, check)


async def fetch_image_bytes(url: str, settings: ServerSettings, param: str) -> bytes:
    """Download an http(s) image within the size and time limits."""
    if not settings.allow_remote_images:
        raise bad_request("remote image URLs are disabled on this server; send the image inline as a "
                          "data URL (data:image/png;base64,...)", param)
    try:
        return await asyncio.wait_for(_download(url, settings, param), settings.remote_image_timeout_s)
    except (TimeoutError, asyncio.TimeoutError):
        raise bad_request(f"fetching the image took longer than {settings.remote_image_timeout_s} s",
                          param) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise bad_request(f"could not fetch the image: {exc}", param) from None


async def _download(url: str, settings: ServerSettings, param: str) -> bytes:
    """GET `url`, following up to `MAX_REDIRECTS` redirects by hand: each hop's host is resolved and
    checked, and the request goes to the checked address (the host name still in `Host` and TLS)."""
    max_bytes = settings.max_image_bytes
    too_big = bad_request(f"the image is larger than this server's limit of {max_bytes} bytes", param)
    target = httpx.URL(url)
    async with httpx.AsyncClient(follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            if target.scheme not in ("http", "https"):
                raise bad_request(f"an image URL (or a redirect) must be http or https, not {target.scheme}", param)
            address = await _checked_address(target, settings.allow_private_image_hosts, param)
            pinned = target.copy_with(host=address)
            headers = {"Host": target.netloc.decode("ascii")}
            async with client.stream("GET", pinned, headers=headers,
                                     extensions={"sni_hostname": target.host}) as response:
                if response.is_redirect and "location" in response.headers:
                    target = target.join(response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise bad_request(f"fetching the image failed with HTTP {response.status_code}", param)
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise too_big
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise too_big
                return bytes(body)
    raise bad_request(f"fetching the image took more than {MAX_REDIRECTS} redirects", param)


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address (an IPv4-mapped IPv6 address is judged as its IPv4 one)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (address.is_multicast or address.is_reserved)


async def _checked_address(url: httpx.URL, allow_private: bool, param: str) -> str:
    """One address `url`'s host resolves to, once every address it resolves to is allowed."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(url.host, url.port or DEFAULT_PORTS[url.scheme],
                                                             type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise bad_request(f"could not resolve the image host {url.host!r}", param) from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    blocked = [a for a in addresses if not (allow_private or is_public(a))]
    if blocked:
        raise bad_request(f"the image host {url.host!r} resolves to a non-public address ({blocked[0]}); this "
                          "server fetches images from public addresses only", param)
    return str(addresses[0])  # getaddrinfo answers at least one address or raises


async def load_image(
    url: str, settings: ServerSettings, param: str, check: SizeCheck | None = None,
    run: Blocking = asyncio.to_thread,
) -> Image.Image:
    """An image part's URL -> an RGB PIL image, decoded by `run`."""
    scheme = url[: url.find(":")].lower() if ":" in url else ""
    if scheme == "data":
        return await run(decode_data_url, url, settings.max_image_bytes, settings.max_image_pixels, param, check)
    if scheme in ("http", "https"):
        data = await fetch_image_bytes(url, settings, param)
        return await run(decode_image, data, settings.max_image_pixels, param, check)
    raise bad_request("an image URL must be a data: URL (or http(s) where the server allows it)", param)


def check_image_count(messages: list[ChatMessage], settings: ServerSettings, multimodal: bool) -> None:
    """Refuse images to a text-only model, and too many images, before decoding any."""
    count = 0
    for i, message in enumerate(messages):
        for j, part in enumerate(message.content):
            if isinstance(part, ImagePart):
                if not multimodal:
                    raise bad_request("this model does not accept images", f"messages[{i}].content[{j}]")
                count += 1
    if count > settings.max_images:
        raise bad_request(f"the request has {count} images; this server accepts at most "
                          f"{settings.max_images}", "messages")


async def engine_messages(
    messages: list[ChatMessage], settings: ServerSettings, check: SizeCheck | None = None,
    run: Blocking = asyncio.to_thread,
) -> list[dict]:
    """Request messages -> the engine's format: text-only content as one string, otherwise a list
    of {"type": "text", "text"} and {"type": "image", "image": PIL.Image} parts."""
    out = []
    for i, message in enumerate(messages):
        parts: list[dict] = []
        for j, part in enumerate(message.content):
            if isinstance(part, ImagePart):
                param = f"messages[{i}].content[{j}].image_url.url"
                image = await load_image(part.image_url.url, settings, param, check, run)
                parts.append({"type": "image", "image": image})
            else:
                parts.append({"type": "text", "text": part.text})
        role = _ROLES.get(message.role, message.role)
        if all(p["type"] == "text" for p in parts):
            out.append({"role": role, "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": role, "content": parts})
    return out
