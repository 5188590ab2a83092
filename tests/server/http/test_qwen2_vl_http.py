"""A Qwen2-VL image over HTTP with the official client: a base64 PNG through the server's image
loading, the chat template and the image-only processor, answered greedily (with n-gram drafting)
exactly as the model's own `generate` answers the same prompt (tiny random model, float64)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

from ..test_qwen2_vl import MAX_NEW, engine_for, image_prompt, make_tiny_qwen_vl, reference_greedy

TEXT = "describe the red circle. a red circle, a blue"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_an_image_over_http_equals_generate(launch, tmp_path, family):
    engine = engine_for(make_tiny_qwen_vl(family, tmp_path), "ngram")
    expected = reference_greedy(engine, image_prompt(engine, text=TEXT))
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    image.paste((20, 40, 220), (0, 0, 24, 13))  # the image `image_prompt` draws
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with launch(create_app(engine, ServerSettings(served_model_name="qwen-vl"))) as server:
        answer = server.openai().chat.completions.create(
            model="qwen-vl", temperature=0, max_tokens=MAX_NEW, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": TEXT}]}])
        assert answer.usage.completion_tokens == len(expected)
        assert answer.choices[0].message.content == engine.tokenizer.decode(expected, skip_special_tokens=True)
        assert answer.model_extra["spec_decode"]["verify_steps"] > 0
