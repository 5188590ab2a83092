"""`--chat-template`: a model without a template serves chat once given one; a file or the template
itself; a broken template stops the command before the model loads."""

from __future__ import annotations

import argparse
import shutil

import pytest

from specserve.server.engine import Engine
from specserve.server.engine.args import chat_template
from specserve.server.engine.config import EngineConfig
from specserve.server.http.app import create_app

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "


@pytest.fixture(scope="module")
def untemplated(tiny_model_dirs, tmp_path_factory):
    """The tiny llama without its chat template."""
    path = tmp_path_factory.mktemp("untemplated") / "llama"
    shutil.copytree(tiny_model_dirs["llama"], path)
    (path / "chat_template.jinja").unlink()
    return path


def test_a_model_without_a_template_serves_chat_once_given_one(launch, untemplated):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bare = Engine.from_config(EngineConfig(model=str(untemplated), draft="ngram"))
    with launch(create_app(bare)) as server, server.http() as client:
        refused = client.post("/v1/chat/completions", json=chat)
    templated = Engine.from_config(EngineConfig(model=str(untemplated), draft="ngram", chat_template=TEMPLATE))
    with launch(create_app(templated)) as server, server.http() as client:
        answered = client.post("/v1/chat/completions", json=chat)
    assert refused.status_code == 400 and "chat template" in refused.json()["error"]["message"]
    assert answered.status_code == 200
    expected = templated.tokenizer.encode("[user] hi\n[assistant] ", add_special_tokens=False)
    assert answered.json()["usage"]["prompt_tokens"] == len(expected)
    assert templated.prepare_chat([{"role": "user", "content": "hi"}]).token_ids == expected


def test_the_flag_takes_a_file_or_the_template_itself(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert chat_template(str(path)) == TEMPLATE and chat_template(TEMPLATE) == TEMPLATE
    with pytest.raises(argparse.ArgumentTypeError, match="neither a file nor a Jinja template"):
        chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(argparse.ArgumentTypeError, match="does not parse: .* \\(line 1\\)"):
        chat_template("{% for m in messages %}{{ m }}")
