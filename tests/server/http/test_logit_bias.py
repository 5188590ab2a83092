"""`logit_bias` and `min_tokens` over a real socket with the official client: the answer is the
engine's own under the same constraints, and bad values are 400s naming the field."""

from __future__ import annotations

import openai
import pytest

from specserve.server.engine.config import SamplingParams
from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def server(launch, make_engine):
    with launch(create_app(make_engine(), ServerSettings(served_model_name="tiny"))) as running:
        yield running


@pytest.fixture(scope="module")
def reference(make_engine):
    return make_engine()


def test_logit_bias_gives_the_engines_biased_answer(server, reference):
    client = server.openai()
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                       logit_bias={"11": 6.0, "12": -100}, extra_body={"ignore_eos": True})
    expected = reference.generate(reference.prepare_text(PROMPT), SamplingParams(
        max_tokens=6, ignore_eos=True, logit_bias=((11, 6.0), (12, -100.0))))
    plain = reference.generate(reference.prepare_text(PROMPT), SamplingParams(max_tokens=6, ignore_eos=True))
    assert answer.choices[0].text == expected.text != plain.text


def test_min_tokens_holds_off_the_end(server, reference):
    eos = str(min(reference.eos_token_ids))
    client = server.openai()
    ended = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=10, temperature=0, logit_bias={eos: 100})
    assert (ended.usage.completion_tokens, ended.choices[0].finish_reason) == (1, "stop")
    held = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=10, temperature=0, logit_bias={eos: 100},
                                          extra_body={"min_tokens": 4})
    assert (held.usage.completion_tokens, held.choices[0].finish_reason) == (5, "stop")


@pytest.mark.parametrize("extra, param", [
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": True}}, "logit_bias.5"), ({"logit_bias": [5]}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),  # outside the vocabulary: refused by the engine
    ({"min_tokens": 11}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": "2"}, "min_tokens"),
])
def test_bad_values_are_400s_naming_the_field(server, extra, param):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError):  # the official client surfaces it as such
        server.openai().chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=10, extra_body=extra)
