"""OpenAI (and vLLM) request fields that change the output and that specserve does not implement:
refused with a 400 naming the field, over a real socket, when set to anything but null or their "off"
value, which is accepted and answered; the server keeps answering other requests."""

from __future__ import annotations

import openai
import pytest

from specserve.server.http.app import create_app
from specserve.server.http.settings import ServerSettings

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
# field -> (a value that changes nothing, a value this server would have to implement)
SHARED = {
    "frequency_penalty": (0, 0.5), "presence_penalty": (0.0, -1),
    "repetition_penalty": (1, 1.2),
    "min_p": (0, 0.1), "use_beam_search": (False, True), "guided_json": (None, {"type": "object"}),
    "guided_regex": (None, "a+"), "guided_choice": (None, ["a", "b"]), "guided_grammar": (None, "root ::= x"),
    "structured_outputs": (None, {"json": {}}),
}
CHAT_ONLY = {
    "functions": ([], [TOOL["function"]]),
    "function_call": ("none", "auto"), "prediction": (None, {"type": "content", "content": "x"}),
    "audio": (None, {"voice": "alloy", "format": "wav"}), "modalities": (["text"], ["text", "audio"]),
    "reasoning_effort": (None, "high"), "verbosity": ("medium", "low"), "web_search_options": (None, {}),
}
COMPLETIONS_ONLY = {"suffix": ("", "tail"), "best_of": (1, 3)}


@pytest.fixture(scope="module")
def server(launch, make_engine):
    with launch(create_app(make_engine(), ServerSettings(served_model_name="tiny"))) as running:
        yield running


def post(server, path: str, field: str, value) -> tuple[int, dict]:
    body = {"model": "tiny", "max_tokens": 2, field: value}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if path.endswith("chat/completions") else {"prompt": "hi"}
    with server.http() as http:
        response = http.post(path, json=body)
    return response.status_code, response.json()


@pytest.mark.parametrize("path, fields", [("/v1/chat/completions", SHARED | CHAT_ONLY),
                                          ("/v1/completions", SHARED | COMPLETIONS_ONLY)])
def test_unsupported_fields_are_refused_unless_off(server, path, fields):
    for field, (off, on) in fields.items():
        status, body = post(server, path, field, on)
        assert status == 400, (field, body)
        assert body["error"]["param"] == field and "not supported by this server" in body["error"]["message"]
        assert post(server, path, field, off)[0] == 200, field
        assert post(server, path, field, None)[0] == 200, field


def test_a_boolean_is_not_the_number_zero(server):
    status, body = post(server, "/v1/chat/completions", "presence_penalty", False)
    assert status == 400 and body["error"]["param"] == "presence_penalty"


def test_best_of_equal_to_n_is_accepted(server):
    with server.http() as http:
        response = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "n": 2,
                                                      "best_of": 2})
    assert response.status_code == 200 and len(response.json()["choices"]) == 2


def test_the_official_client_sees_a_bad_request_naming_the_field(server):
    client = server.openai()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       presence_penalty=0.5)
    assert error.value.body["param"] == "presence_penalty"
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert answer.choices[0].message.content is not None
