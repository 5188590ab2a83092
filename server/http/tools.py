"""Tool calling (`tools`, `tool_choice`, `parallel_tool_calls`) for chat templates that write calls as
`<tool_call>` blocks (Qwen2.5, Hermes and the templates modelled on them):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The tools reach the model through its own chat template (`tools=` of `apply_chat_template`), and so
do earlier calls and their results (assistant `tool_calls`, `tool` messages). The answer's blocks
become OpenAI `tool_calls` (`parse_calls`; `ToolStream` while streaming); text outside them stays
the message content. `tool_choice` "required" or a named function is a Lark grammar (`call_grammar`)
that the engine enforces like a response format: one call (or several, with `parallel_tool_calls`),
each naming an allowed function with arguments that match its `parameters` schema; the grammar also
drafts the call's forced text (`<tool_call>`, the name, the keys). With "auto" the model decides and
nothing is enforced; with "none" the tools are described but answers are not parsed for calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..engine.config import ResponseFormat
from .errors import bad_request
from .protocol import ChatCompletionRequest, ChatMessage
from .responses import FunctionCall, ToolCall, ToolCallDelta

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
# the JSON layout of grammar-made calls: the one these templates show their models
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolSetup:
    """A request's tools as the template, the grammar and the answer parser need them."""

    tools: list[dict]  # OpenAI function tools, for the chat template
    names: frozenset[str]
    parse: bool  # parse the answer for calls (every tool_choice but "none")
    grammar: ResponseFormat | None  # "required" or a named function: the calls the answer must be


def setup(req: ChatCompletionRequest, template: str | None, tokenizer) -> ToolSetup | None:
    """Check the request's tool fields against each other and the model's template (400s naming the
    field); None when the request has no tools."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if not template or "tools" not in template:
        raise bad_request("this model's chat template has no tool support, so it cannot be given tools", "tools")
    if OPEN not in template:
        raise bad_request(f"this server parses tool calls written as {OPEN} blocks (Qwen2.5, Hermes); this "
                          "model's chat template uses another format", "tools")
    functions = {tool.function.name: tool.function for tool in req.tools}
    if len(functions) < len(req.tools):
        raise bad_request("tools must have distinct function names", "tools")
    if req.response_format is not None and req.response_format.type != "text" and choice != "none":
        raise bad_request("response_format cannot be combined with tools (unless tool_choice is \"none\")",
                          "response_format")
    forced = choice == "required" or not isinstance(choice, (str, type(None)))
    if forced and (req.ignore_eos or req.min_tokens):
        raise bad_request("ignore_eos and min_tokens cannot be combined with a required tool call: the call's "
                          "grammar decides where the answer ends", "tool_choice")
    chosen = None
    if not isinstance(choice, str) and choice is not None:
        chosen = choice.function.name
        if chosen not in functions:
            raise bad_request(f"tool_choice names {chosen!r}, which is not among the tools", "tool_choice")
    tools = [tool.model_dump(exclude_none=True, by_alias=True) for tool in req.tools]
    grammar = None
    if choice == "required" or chosen is not None:
        allowed = [functions[chosen]] if chosen is not None else list(functions.values())
        grammar = call_grammar([(f.name, f.parameters) for f in allowed], req.parallel_tool_calls is not False,
                               (_single_token(tokenizer, OPEN), _single_token(tokenizer, CLOSE)))
    return ToolSetup(tools, frozenset(functions), choice != "none", grammar)


def call_grammar(functions: list[tuple[str, dict | None]], parallel: bool,
                 tags: tuple[int | None, int | None] = (None, None)) -> ResponseFormat:
    """A Lark grammar (llguidance's dialect, with an inline JSON schema) for one or more calls of the
    given functions (name, parameters schema or None for any object). `tags`: the token ids of
    `<tool_call>` and `</tool_call>` where the tokenizer has one token for each (Qwen2.5): the
    grammar names those tokens, since llguidance matches such added tokens only by id."""
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}}}
             for name, parameters in functions]
    schema = {"x-guidance": _LAYOUT, "anyOf": calls}
    # a newline may follow the last call: the templates put one between calls, and a model that
    # writes one after its last call must still be able to end there
    repeat = ' ("\\n" call)* "\\n"?' if parallel else ' "\\n"?'
    opening, closing = (json.dumps(tag) if token is None else f"<[{token}]>" for tag, token in zip((OPEN, CLOSE), tags))
    lark = (f"start: call{repeat}\n"
            f'call: {opening} "\\n" args "\\n" {closing}\n'
            f"args: %json {json.dumps(schema)}\n")
    return ResponseFormat("lark", lark)


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def history(message: ChatMessage, index: int) -> dict:
    """The template fields of an earlier assistant call or tool result: arguments as objects (the
    templates serialise them themselves)."""
    fields: dict = {}
    if message.tool_call_id is not None:
        fields["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for j, call in enumerate(message.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                raise bad_request("a tool call's arguments must be a JSON string",
                                  f"messages[{index}].tool_calls[{j}].function.arguments") from None
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        fields["tool_calls"] = calls
    return fields


def _call(block: str, names: frozenset[str]) -> ToolCall | None:
    """A block's call, or None if it is not one (not JSON, no such function): it then stays text."""
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=value["name"], arguments=text))


def parse_calls(text: str, names: frozenset[str]) -> tuple[str | None, list[ToolCall]]:
    """A whole answer -> (its content outside the calls, or None if nothing is left; its calls)."""
    calls, kept, end = [], [], 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1), names)
        if call is None:
            continue
        calls.append(call)
        kept.append(text[end : match.start()])
        end = match.end()
    kept.append(text[end:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


class ToolStream:
    """One streamed choice: text deltas in, (content delta, tool call deltas) out. Text that may
    start a block is held back until it does or cannot; a block is sent as one tool call delta
    when it closes (id, name and the whole arguments), or as text if it is not a call."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.buffer = ""
        self.calls = 0

    def feed(self, text: str, finished: bool) -> tuple[str, list[ToolCallDelta]]:
        self.buffer += text
        content, deltas = "", []
        while True:
            start = self.buffer.find(OPEN)
            if start < 0:
                break
            close = self.buffer.find(CLOSE, start)
            if close < 0:
                content += self.buffer[:start]
                self.buffer = self.buffer[start:]
                return self._end(content, deltas, finished)
            content += self.buffer[:start]
            block = self.buffer[start : close + len(CLOSE)]
            self.buffer = self.buffer[close + len(CLOSE):]
            call = _call(block[len(OPEN) : -len(CLOSE)].strip(), self.names)
            if call is None:
                content += block
                continue
            deltas.append(ToolCallDelta(index=self.calls, id=call.id, type="function", function=call.function))
            self.calls += 1
        held = _partial_open(self.buffer)
        content += self.buffer[: len(self.buffer) - held]
        self.buffer = self.buffer[len(self.buffer) - held:]
        return self._end(content, deltas, finished)

    def _end(self, content: str, deltas: list[ToolCallDelta], finished: bool) -> tuple[str, list[ToolCallDelta]]:
        if finished:  # an unclosed block or a held-back "<tool" was text after all
            content, self.buffer = content + self.buffer, ""
        if self.calls and not content.strip():
            content = ""  # whitespace between and after calls is not content
        return content, deltas


def _partial_open(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `<tool_call>`."""
    for size in range(min(len(text), len(OPEN) - 1), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0
