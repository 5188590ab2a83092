"""An Idefics3 / SmolVLM image over HTTP with the official client: a base64 PNG through the server's
image loading, the chat template and the tiling processor (several tiles + the global image),
answered greedily (with n-gram drafting) exactly as the model's own `generate` answers the same
prompt (tiny random model, float64)."""

from __future__ import annotations

import base64
import io

import pytest

from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

from ..test_idefics3 import MAX_NEW, engine_for, image_prompt, make_tiny_idefics3, picture, reference_greedy

TEXT = "describe the red circle. a red circle, a blue"


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_an_image_over_http_equals_generate(launch, tmp_path, family):
    engine = engine_for(make_tiny_idefics3(family, tmp_path), "ngram")
    prompt = image_prompt(engine, text=TEXT)
    assert prompt.images["pixel_values"].shape[1] == 5  # 2x2 tiles + the global image
    expected = reference_greedy(engine, prompt)
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")  # the image `image_prompt` draws
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with launch(create_app(engine, ServerSettings(served_model_name="idefics3"))) as server:
        answer = server.openai().chat.completions.create(
            model="idefics3", temperature=0, max_tokens=MAX_NEW, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": TEXT}]}])
        assert answer.usage.prompt_tokens == len(prompt.token_ids)
        assert answer.usage.completion_tokens == len(expected)
        assert answer.choices[0].message.content == engine.tokenizer.decode(expected, skip_special_tokens=True)
        assert answer.model_extra["spec_decode"]["verify_steps"] > 0
