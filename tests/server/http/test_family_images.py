"""Images at the edges of what each vision-language family's processor takes, over HTTP with the
official client: every request is either served (and then greedy output equals the model's own
`generate` on the same image) or refused with a 400 naming the field, never a 500, and the server
answers a normal request afterwards. Tiny random models (float64), one server per family.

Served: 1x1, 2x3, 1x20, 20x1 and a normal image, and as many images as `--max-images`, for every
family (each processor resizes tiny images up: Qwen's smart_resize to its minimum pixels, LLaVA's
shortest edge, anyres pinpoints, Idefics3 tiles, Gemma 3's fixed size). Refused: 21x1 (past the 20:1
aspect bound), a PNG whose header claims 50000x50000, one image more than `--max-images`, text that
spells the model's image placeholder, an image that the chat template leaves out (the processor's
own count check), and any image to a text-only model."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import openai
import pytest
import torch
from PIL import Image

from specserve.drafting.budget import TreeBudget
from specserve.server.engine import Engine
from specserve.server.engine.config import EngineConfig
from specserve.server.engine.outputs import image_tensors
from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

from ...conftest import CHAT_TEMPLATE, make_tiny_model
from ..test_gemma3 import make_tiny_gemma3
from ..test_idefics3 import make_tiny_idefics3
from ..test_llava_next import make_tiny_llava_next
from ..test_qwen2_vl import make_tiny_qwen_vl
from .test_images import png_header_only

MAKERS = {
    "llava": lambda path: make_tiny_model("llava", path),
    "llava_next": lambda path: make_tiny_llava_next("llava_next", path),
    "llava_onevision": lambda path: make_tiny_llava_next("llava_onevision", path),
    "qwen2_vl": lambda path: make_tiny_qwen_vl("qwen2_vl", path),
    "qwen2_5_vl": lambda path: make_tiny_qwen_vl("qwen2_5_vl", path),
    "qwen3_vl": lambda path: make_tiny_qwen_vl("qwen3_vl", path),
    "idefics3": lambda path: make_tiny_idefics3("idefics3", path),
    "smolvlm": lambda path: make_tiny_idefics3("smolvlm", path),
    "gemma3": make_tiny_gemma3,
}
MAX_IMAGES = 2
MAX_NEW = 8
SERVED_SIZES = [(1, 1), (2, 3), (1, 20), (20, 1), (48, 40)]
URL_PARAM = "messages[0].content[0].image_url.url"


def engine_for(path, **config) -> Engine:
    return Engine.from_config(EngineConfig(model=str(path), draft="ngram", dtype="float64", batch_tree_tokens=0,
                                           tree=TreeBudget(depth=4, branching=3, draft_nodes=8), **config))


@pytest.fixture(scope="module", params=list(MAKERS))
def family(request, tmp_path_factory, launch):
    """The family's engine, its server (at most `MAX_IMAGES` images a request) and a client."""
    engine = engine_for(MAKERS[request.param](tmp_path_factory.mktemp(request.param)))
    with launch(create_app(engine, ServerSettings(served_model_name="m", max_images=MAX_IMAGES))) as server:
        yield SimpleNamespace(engine=engine, client=server.openai())


def picture(size: tuple[int, int], shade: int = 0) -> Image.Image:
    image = Image.new("RGB", size, (200, 30 + shade, 30))
    image.putpixel((0, 0), (20, 40, 220))  # not uniform, even at 1x1 the colour differs from 2x3's
    return image


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(client: openai.OpenAI, content: list[dict], **kwargs):
    return client.chat.completions.create(model="m", temperature=0, max_tokens=MAX_NEW, logprobs=True,
                                          messages=[{"role": "user", "content": content}], **kwargs)


def refused(call) -> openai.APIStatusError:
    """The call's 400 (a 500 or any other status fails here)."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert info.value.status_code == 400, info.value.message
    error = info.value
    assert error.type == "invalid_request_error" and error.param.startswith("messages"), error.body
    return error


def assert_still_serves(client: openai.OpenAI) -> None:
    answer = ask(client, [{"type": "text", "text": "the quick brown fox"}])
    assert answer.usage.completion_tokens > 0


def reference_greedy(engine: Engine, content: list[dict]) -> list[str]:
    """The model's own greedy tokens (as text, one string per token) for engine-side `content`."""
    prompt = engine.prepare_chat([{"role": "user", "content": content}])
    ids = torch.tensor([prompt.token_ids])
    out = engine.target.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
        **image_tensors(prompt.images, "cpu", torch.float64), **engine.target.adapter.token_types(ids))
    return [engine.tokenizer.decode([t]) for t in out[0, ids.shape[1]:].tolist()]


def served_tokens(answer) -> list[str]:
    assert answer.choices[0].logprobs.content, answer
    return [t.token for t in answer.choices[0].logprobs.content]


@pytest.mark.parametrize("size", SERVED_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiny_thin_and_normal_images_are_served_exactly(family, size):
    image = picture(size)
    text = {"type": "text", "text": "describe the red circle. a red circle"}
    answer = ask(family.client, [url_part(data_url(png(image))), text])
    assert served_tokens(answer) == reference_greedy(family.engine, [{"type": "image", "image": image}, text])


@pytest.mark.parametrize("data, says", [
    (png(picture((21, 1))), "20:1"),
    (png(picture((1, 21))), "20:1"),
    (png_header_only(50_000, 50_000), "pixels"),
], ids=["21x1", "1x21", "50000x50000 by header"])
def test_extreme_images_are_a_400_naming_the_part(family, data, says):
    error = refused(lambda: ask(family.client, [url_part(data_url(data)), {"type": "text", "text": "?"}]))
    assert error.param == URL_PARAM and says in error.message
    assert_still_serves(family.client)


def test_as_many_images_as_the_limit_are_served_and_one_more_is_a_400(family):
    images = [picture((48, 40)), picture((40, 56), shade=150)]
    assert len(images) == MAX_IMAGES
    # text between the images, as real templates put markers there (Qwen's <|vision_start|> ...)
    content = [p for i, image in enumerate(images) for p in (
        {"type": "text", "text": f"picture {i}:"}, {"type": "image", "image": image})]
    content.append({"type": "text", "text": "compare them. a red circle"})
    over_http = [url_part(data_url(png(p["image"]))) if p["type"] == "image" else p for p in content]
    assert served_tokens(ask(family.client, over_http)) == reference_greedy(family.engine, content)
    error = refused(lambda: ask(family.client, [*over_http, url_part(data_url(png(images[0])))]))
    assert error.param == "messages" and f"at most {MAX_IMAGES}" in error.message
    assert_still_serves(family.client)


def test_text_that_spells_the_image_placeholder_is_a_400(family):
    placeholder = family.engine.tokenizer.image_token  # what the template's image expands to in tokens
    url = data_url(png(picture((48, 40))))
    for content in ([{"type": "text", "text": f"what is {placeholder}?"}],
                    [url_part(url), {"type": "text", "text": f"and {placeholder} too"}]):
        error = refused(lambda: ask(family.client, content))
        assert error.param == "messages" and "image placeholder" in error.message
    assert_still_serves(family.client)


def test_an_image_the_template_leaves_out_is_the_processors_400(launch, tmp_path):
    """A template that renders images in user messages only: a system message's image reaches the
    processor without a placeholder, and the processor's own count check refuses it."""
    user_images_only = CHAT_TEMPLATE.replace("p['type'] == 'image'", "p['type'] == 'image' and m['role'] == 'user'")
    engine = engine_for(make_tiny_model("llava", tmp_path), chat_template=user_images_only)
    with launch(create_app(engine, ServerSettings(served_model_name="m"))) as server:
        client = server.openai()
        url = data_url(png(picture((48, 40))))
        error = refused(lambda: client.chat.completions.create(model="m", max_tokens=2, messages=[
            {"role": "system", "content": [url_part(url)]}, {"role": "user", "content": "hi"}]))
        assert error.param == "messages" and "processor refused" in error.message
        assert_still_serves(client)


def test_an_image_to_a_text_only_model_is_a_400(launch, tmp_path):
    engine = engine_for(make_tiny_model("llama", tmp_path))
    with launch(create_app(engine, ServerSettings(served_model_name="m"))) as server:
        client = server.openai()
        error = refused(lambda: ask(client, [{"type": "text", "text": "what is this?"},
                                             url_part(data_url(png(picture((48, 40)))))]))
        assert error.param == "messages[0].content[1]" and "does not accept images" in error.message
        assert_still_serves(client)
