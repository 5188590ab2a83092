"""The OpenAI-compatible HTTP server.

`app.create_app(engine_or_factory, settings.ServerSettings(...))` builds a FastAPI app; `serve` holds
the `specserve serve` options and the uvicorn runner. A request flows: `protocol` (pydantic bodies)
-> `images` (data URLs, limits) -> the engine's chat template, on the worker -> `sampling`
(SamplingParams and limits) -> `scheduler` (one worker thread, round-robin over sequences) ->
`generation` (JSON or `sse` event stream, rendered by `chat` / `completions` into `responses`).
`errors` gives every failure OpenAI's error shape; `prometheus` exports the metrics on /metrics.
"""
