"""A Gemma 3 image over HTTP with the official client: a base64 PNG through the server's image
loading, the chat template and `Gemma3Processor` (its PIL image processor), answered greedily (with
n-gram drafting) exactly as the model's own `generate` answers the same prompt, each image seen
bidirectionally (tiny random model, float64)."""

from __future__ import annotations

import base64
import io

from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

from ..test_gemma3 import MAX_NEW, engine_for, image_prompt, make_tiny_gemma3, picture, reference_greedy

TEXT = "describe the red circle. a red circle, a blue"


def test_an_image_over_http_equals_generate(launch, tmp_path):
    engine = engine_for(make_tiny_gemma3(tmp_path), "ngram")
    expected = reference_greedy(engine, image_prompt(engine, text=TEXT))
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")  # the image `image_prompt` uses
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with launch(create_app(engine, ServerSettings(served_model_name="gemma3"))) as server:
        answer = server.openai().chat.completions.create(
            model="gemma3", temperature=0, max_tokens=MAX_NEW, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": TEXT}]}])
        assert answer.usage.completion_tokens == len(expected)
        assert answer.choices[0].message.content == engine.tokenizer.decode(expected, skip_special_tokens=True)
        assert answer.model_extra["spec_decode"]["verify_steps"] > 0
