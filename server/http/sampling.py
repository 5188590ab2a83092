"""Request fields -> the engine's `SamplingParams`, with the limits that need the prompt length,
the model's context or the server's settings. Each refusal is a 400 naming its field."""

from __future__ import annotations

from dataclasses import replace

from ..engine.config import ResponseFormat, SamplingParams
from .errors import bad_request
from .protocol import INT64_MAX, INT64_MIN, ChatCompletionRequest, CompletionRequest, _Sampling
from .settings import ServerSettings

OPENAI_DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; send temperature 0 for greedy decoding
# Tokenizers of served models average 3-5 characters per token on prose and code; a text that needs
# more than 16 per token to fit the context is refused before it costs a tokenizer pass.
CHARS_PER_TOKEN_LIMIT = 16


def check_prompt_chars(chars: int, max_model_len: int, settings: ServerSettings, field: str) -> None:
    """Refuse a prompt text longer than `max_prompt_chars` (default: 16 x the context), on arrival."""
    limit = settings.max_prompt_chars or CHARS_PER_TOKEN_LIMIT * max_model_len
    if chars > limit:
        raise bad_request(f"the prompt has {chars} characters; this server accepts at most {limit} per "
                          f"prompt", field)


def check_prompt_len(prompt_len: int, max_model_len: int, field: str) -> None:
    if prompt_len == 0:
        raise bad_request("the prompt is empty", field)
    if prompt_len >= max_model_len:
        raise bad_request(f"the prompt has {prompt_len} tokens, but this model's context is "
                          f"{max_model_len} tokens (the reply needs at least one more)", field)


def resolve_max_tokens(
    requested: int | None, field: str, prompt_len: int, max_model_len: int, settings: ServerSettings,
    default: int | None,
) -> int:
    """The request's token limit: as asked (if it fits), else the default, else the rest of the context."""
    room = max_model_len - prompt_len
    if requested is None:
        return min(x for x in (room, default, settings.max_tokens_limit) if x is not None)
    if settings.max_tokens_limit is not None and requested > settings.max_tokens_limit:
        raise bad_request(f"{field} is {requested}; this server allows at most "
                          f"{settings.max_tokens_limit}", field)
    if requested > room:
        raise bad_request(f"this model's context is {max_model_len} tokens; the prompt has {prompt_len} "
                          f"and {field} asks for {requested} more", field)
    return requested


def check_choices(n: int, prompts: int, settings: ServerSettings) -> None:
    if n * prompts > settings.max_n:
        what = "n" if prompts == 1 else "n x the number of prompts"
        raise bad_request(f"{what} is {n * prompts}; this server allows at most {settings.max_n}", "n")


def _base(req: _Sampling, settings: ServerSettings, max_tokens: int, logprobs: int | None) -> SamplingParams:
    if req.stop is not None and len(req.stop) > settings.max_stop:
        raise bad_request(f"at most {settings.max_stop} stop strings are allowed", "stop")
    temperature = OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    if req.min_tokens is not None and req.min_tokens > max_tokens:
        raise bad_request(f"min_tokens is {req.min_tokens}, more than the request's {max_tokens} max tokens",
                          "min_tokens")
    response_format = _response_format(req)
    if response_format is not None:
        for field, value in (("ignore_eos", req.ignore_eos), ("min_tokens", req.min_tokens)):
            if value:
                raise bad_request(f"{field} cannot be combined with response_format: the format's grammar "
                                  "decides where the output ends", field)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),  # -1 (vLLM) and 0 both mean off
        stop=tuple(req.stop or ()),
        seed=req.seed,
        logprobs=logprobs,
        ignore_eos=bool(req.ignore_eos),
        speculative=req.speculative is not False,  # null: the default
        logit_bias=tuple((int(token), bias) for token, bias in (req.logit_bias or {}).items()),
        min_tokens=req.min_tokens or 0,
        response_format=response_format,
    )


def _response_format(req: _Sampling) -> ResponseFormat | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat("json_object")
    return ResponseFormat.json_schema(fmt.json_schema.schema_)


def per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One params per choice. With a seed, choice i gets seed + i (wrapped into int64) so the
    choices differ from each other but the request as a whole is reproducible."""
    if params.seed is None:
        return [params] * n
    span = INT64_MAX - INT64_MIN + 1
    return [replace(params, seed=(params.seed + i - INT64_MIN) % span + INT64_MIN) for i in range(n)]


def chat_params(req: ChatCompletionRequest, prompt_len: int, max_model_len: int,
                settings: ServerSettings) -> list[SamplingParams]:
    """SamplingParams for each of the request's n choices."""
    n = req.n or 1
    check_choices(n, 1, settings)
    check_prompt_len(prompt_len, max_model_len, "messages")
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = resolve_max_tokens(requested, field, prompt_len, max_model_len, settings,
                                    settings.default_max_tokens)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return per_choice(_base(req, settings, max_tokens, logprobs), n)


def completion_params(req: CompletionRequest, prompt_len: int, max_model_len: int,
                      settings: ServerSettings, default_max_tokens: int) -> list[SamplingParams]:
    """SamplingParams for the n choices of one prompt of a (possibly batched) completion request."""
    if req.echo:
        raise bad_request("echo is not supported", "echo")
    check_prompt_len(prompt_len, max_model_len, "prompt")
    max_tokens = resolve_max_tokens(req.max_tokens, "max_tokens", prompt_len, max_model_len, settings,
                                    default_max_tokens)
    return per_choice(_base(req, settings, max_tokens, req.logprobs), req.n or 1)
