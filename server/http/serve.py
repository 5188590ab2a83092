"""`specserve serve`: the command-line options of the HTTP server, and running it under uvicorn.

`server/cli.py` owns the command; it calls `add_serve_arguments(parser)` on its `serve` subparser
and `run_serve(args)` to run it.
"""

from __future__ import annotations

import argparse
import sys

from ..engine.args import add_engine_arguments, engine_config
from .settings import ServerSettings

_D = ServerSettings()  # defaults shown in --help


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's options (--model, --draft, --dtype, --device, ...) plus the server's."""
    add_engine_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--served-model-name", default=None, help="model id in the API (default: --model)")
    group.add_argument("--max-active", type=int, default=_D.max_active,
                       help="sequences decoded concurrently, interleaved step by step")
    group.add_argument("--max-queue", type=int, default=_D.max_queue,
                       help="sequences allowed to wait for a slot; beyond this requests get 429")
    group.add_argument("--max-n", type=int, default=_D.max_n, help="choices per request")
    group.add_argument("--max-tokens-limit", type=int, default=None, help="cap on a request's max_tokens")
    group.add_argument("--default-max-tokens", type=int, default=None,
                       help="chat max_tokens when a request sets none (default: the rest of the context)")
    group.add_argument("--max-body-bytes", type=int, default=_D.max_body_bytes)
    group.add_argument("--max-images", type=int, default=_D.max_images, help="images per request")
    group.add_argument("--max-image-bytes", type=int, default=_D.max_image_bytes)
    group.add_argument("--max-image-pixels", type=int, default=_D.max_image_pixels)
    group.add_argument("--allow-remote-images", action="store_true",
                       help="fetch http(s) image URLs (the server then makes outbound requests for clients)")
    group.add_argument("--remote-image-timeout", type=float, default=_D.remote_image_timeout_s)
    group.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        served_model_name=args.served_model_name,
        max_active=args.max_active,
        max_queue=args.max_queue,
        max_n=args.max_n,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        max_body_bytes=args.max_body_bytes,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        allow_remote_images=args.allow_remote_images,
        remote_image_timeout_s=args.remote_image_timeout,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted. The model loads on the worker thread after the socket is open, so
    /health answers 503 until it is ready; a model that cannot load stops the server, which exits 1
    with the reason on one line."""
    import uvicorn

    from ..engine import Engine
    from .app import create_app

    config = engine_config(args)
    failures: list[str] = []

    def load_failed(reason: str) -> None:  # on the worker thread; uvicorn polls should_exit
        failures.append(reason)
        server.should_exit = True

    app = create_app(lambda: Engine.from_config(config), settings_from_args(args), on_load_failure=load_failed)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    server.run()
    if failures:
        sys.stderr.write(f"specserve: error: the model failed to load: {failures[0]}\n")
        return 1
    return 0
