"""A LLaVA-NeXT / LLaVA-OneVision image over HTTP with the official client: a base64 PNG through the
server's image loading, the chat template and the anyres processor (4 tiles + the whole image),
answered greedily (with n-gram drafting) exactly as the model's own `generate` answers the same
prompt (tiny random models, float64)."""

from __future__ import annotations

import base64
import io

import pytest

from specserve.server.engine.config import SamplingParams
from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

from ..test_llava_next import (
    FAMILIES,
    MAX_NEW,
    engine_for,
    image_prompt,
    make_tiny_llava_next,
    picture,
    reference_greedy,
)

TEXT = "describe the red circle. a red circle, a blue"


@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_over_http_equals_generate(launch, tmp_path, family):
    engine = engine_for(make_tiny_llava_next(family, tmp_path), "ngram")
    prompt = image_prompt(engine, text=TEXT)
    expected = reference_greedy(engine, prompt)
    # the random model's tokens include lone bytes of multi-byte characters, which the server's
    # detokenizer holds back or drops as `decode(expected)` does not: the engine's own text is the answer
    alone = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW))
    assert alone.token_ids == expected and alone.text
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")  # the 48x40 image `image_prompt` draws
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with launch(create_app(engine, ServerSettings(served_model_name="llava-next"))) as server:
        answer = server.openai().chat.completions.create(
            model="llava-next", temperature=0, max_tokens=MAX_NEW, logprobs=True,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": TEXT}]}])
        assert answer.usage.completion_tokens == len(expected)
        assert answer.choices[0].message.content == alone.text
        assert [t.token for t in answer.choices[0].logprobs.content] == [engine.tokenizer.decode([t]) for t in expected]
        assert answer.model_extra["spec_decode"]["verify_steps"] > 0
