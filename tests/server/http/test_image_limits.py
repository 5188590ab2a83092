"""Images whose processing would be extreme are refused before the model's processor sees them: an
aspect ratio past 20:1, or more pixels once the processor has resized them than the limit.

The regression (finding 1 of issue 14): a 372-byte PNG of 100000x1 pixels passed the pixel limit,
and tiny-vlm's processor (shortest edge to 64, then a crop) held it as 6,400,000x64 float pixels,
3 GB, while every other request waited; 1,000,000x1 ran out of memory."""

from __future__ import annotations

import base64
import io
import resource
import time
from types import SimpleNamespace

import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from specserve.server.engine.errors import RequestError
from specserve.server.engine.prompts import MAX_ASPECT_RATIO, MAX_PROCESSED_PIXELS, PromptBuilder, processed_size
from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings
from specserve.server.store.tiny_vlm.model import IMAGE_SIZE

PARAM = "messages[0].content[0].image_url.url"


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_chat(data: bytes) -> dict:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]}],
        "max_tokens": 2, "temperature": 0}


def tiny_vlm_processor(**overrides) -> CLIPImageProcessorPil:
    """tiny-vlm's image processor, as `tiny_vlm.model.build_processor` makes it."""
    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **overrides)


def test_processed_size_of_the_finding_on_tiny_vlm():
    assert processed_size(tiny_vlm_processor(), 1, 100_000) == (64, 6_400_000)
    assert processed_size(tiny_vlm_processor(), 480, 640) == (64, 85)


@pytest.mark.parametrize("size", [(640, 480), (37, 200), (64, 64), (1280, 64), (3, 5)])
def test_processed_size_is_what_the_processor_makes(size):
    """Against the processor itself: with its crop turned off, its output is the resized image."""
    width, height = size
    uncropped = tiny_vlm_processor(do_center_crop=False)
    pixels = uncropped(Image.new("RGB", size), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape[-2:]) == processed_size(uncropped, height, width)


def test_processed_size_of_other_size_layouts():
    def processor(**size):
        return SimpleNamespace(size=size, do_resize=True)

    assert processed_size(processor(height=224, width=224), 10, 5000) == (224, 224)
    assert processed_size(processor(max_height=100, max_width=100), 50, 400) == (12, 100)
    assert processed_size(processor(shortest_edge=10, longest_edge=40), 10, 1000) == (0, 40)
    assert processed_size(SimpleNamespace(size={"shortest_edge": 8}, do_resize=False), 30, 40) == (30, 40)
    assert processed_size(processor(min_pixels=4, max_pixels=16), 30, 40) == (30, 40)  # unknown: as is


class NotCalled:
    """A processor whose template and config work, and whose call (the image processing) fails."""

    def __init__(self, real) -> None:
        self.image_processor, self.apply_chat_template = real.image_processor, real.apply_chat_template

    def __call__(self, *args, **kwargs):
        raise AssertionError("the processor was called")


@pytest.fixture(scope="module")
def llava(make_engine):
    return make_engine("llava", draft="none")


def test_engine_refuses_extreme_images_before_its_processor(llava, monkeypatch):
    llava.check_image_size(MAX_ASPECT_RATIO, 1)
    llava.check_image_size(1, MAX_ASPECT_RATIO)
    for width, height in [(MAX_ASPECT_RATIO + 1, 1), (1, 100_000), (100_000, 1), (0, 5)]:
        with pytest.raises(RequestError, match="20:1"):
            llava.check_image_size(width, height)
    # prepare_chat (what embedders call) checks too, before the processor is called
    monkeypatch.setattr(llava.prompts, "processor", NotCalled(llava.prompts.processor))
    with pytest.raises(RequestError, match="aspect ratio"):
        llava.prepare_chat([{"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (100_000, 1))}, {"type": "text", "text": "?"}]}])


def test_a_processor_that_would_make_too_many_pixels_is_refused():
    """A square image within the aspect bound, but a processor that resizes to 5000x5000."""
    processor = SimpleNamespace(image_processor=SimpleNamespace(size={"height": 5000, "width": 5000}))
    builder = PromptBuilder(tokenizer=None, processor=processor, multimodal=True)
    assert 5000 * 5000 > MAX_PROCESSED_PIXELS
    with pytest.raises(RequestError, match="5000x5000"):
        builder.check_image_size(64, 64)
    processor.image_processor.size = {"height": 4096, "width": 4096}
    builder.check_image_size(64, 64)


def test_text_only_engine_refuses_images(make_engine):
    with pytest.raises(RequestError, match="does not accept images"):
        make_engine(draft="none").check_image_size(4, 4)


@pytest.fixture(scope="module")
def server(launch, llava):
    with launch(create_app(llava, ServerSettings(max_body_bytes=1024 * 1024))) as running:
        yield running


@pytest.mark.parametrize("width", [100_000, 1_000_000])
def test_a_long_thin_png_is_a_fast_400_that_costs_no_memory(server, width, openai_schema):
    data = png(width, 1)
    assert len(data) < 4096  # a few hundred bytes on the wire
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process's peak memory
    started = time.monotonic()
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=image_chat(data))
    assert time.monotonic() - started < 2.0
    assert response.status_code == 400, response.text
    openai_schema("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == PARAM
    assert "20:1" in response.json()["error"]["message"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 100 * 1024


def test_a_wide_but_acceptable_image_is_served(server):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=image_chat(png(MAX_ASPECT_RATIO * 3, 3)))
    assert response.status_code == 200, response.text
