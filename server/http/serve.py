"""`specserve serve`: the command-line options of the HTTP server, and running it under uvicorn.

`server/cli.py` owns the command; it calls `add_serve_arguments(parser)` on its `serve` subparser
and `run_serve(args)` to run it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..engine.args import add_engine_arguments, engine_config
from . import logs
from .logs import LOG_FORMATS
from .settings import ListenSettings, ServerSettings

_D, _L = ServerSettings(), ListenSettings()  # defaults shown in --help
ENV_PREFIX = "SPECSERVE_"
API_KEY_ENV = ENV_PREFIX + "API_KEY"
SWITCH_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                 "off": False}
logger = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's options (--model, --draft, --dtype, --device, ...) plus the server's."""
    add_engine_arguments(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the engine (default: torch's own, one per physical "
                             "core, less one when that would take every CPU: the event loop keeps a core)")
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=_L.host, help="address to listen on (0.0.0.0: all interfaces)")
    group.add_argument("--port", type=int, default=_L.port)
    group.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="model id(s) in the API; requests may name any, responses carry the first "
                            "(default: --model)")
    group.add_argument("--log-level", default=_L.log_level, choices=["debug", "info", "warning", "error"])
    group.add_argument("--log-format", default="plain", choices=LOG_FORMATS,
                       help="plain text, or one JSON object per line (default: %(default)s)")
    group.add_argument("--log-stats-interval", type=float, default=_D.log_stats_interval_s,
                       help="seconds between stats lines (throughput, queue, KV cache, acceptance) while "
                            "the server is busy; 0: none (default: %(default)s)")
    group.add_argument("--api-key", default=None,
                       help=f"require `Authorization: Bearer KEY` on /v1/* (401 otherwise; /health and /metrics "
                            f"stay open). Prefer ${API_KEY_ENV}: other users can read a flag from the process "
                            f"list (default: ${API_KEY_ENV}, else no key)")
    group.add_argument("--no-ui", action="store_true",
                       help="no playground page at / (the web page that streams answers coloured by drafted "
                            "tokens and compares drafting on and off)")
    group.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                       help="browser origins allowed to call the API (CORS), e.g. https://app.example.com; "
                            "'*' allows any (default: none)")
    limits = parser.add_argument_group("limits (each protects the server from one client)")
    limits.add_argument("--max-active", type=int, default=_D.max_active,
                        help="sequences decoded concurrently, interleaved step by step")
    limits.add_argument("--max-queue", type=int, default=_D.max_queue,
                        help="sequences allowed to wait for a slot; beyond this requests get 429")
    limits.add_argument("--max-n", type=int, default=_D.max_n, help="choices per request")
    limits.add_argument("--max-tokens-limit", type=int, default=None, help="cap on a request's max_tokens")
    limits.add_argument("--default-max-tokens", type=int, default=None,
                        help="chat max_tokens when a request sets none (default: the rest of the context)")
    limits.add_argument("--max-prompt-chars", type=int, default=None,
                        help="characters of one prompt, checked before tokenizing (default: 16 x the context)")
    limits.add_argument("--max-body-bytes", type=int, default=_D.max_body_bytes)
    limits.add_argument("--max-images", type=int, default=_D.max_images, help="images per request")
    limits.add_argument("--max-image-bytes", type=int, default=_D.max_image_bytes)
    limits.add_argument("--max-image-pixels", type=int, default=_D.max_image_pixels)
    limits.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (the server then makes outbound requests for clients)")
    limits.add_argument("--remote-image-timeout", type=float, default=_D.remote_image_timeout_s)
    limits.add_argument("--allow-private-image-hosts", action="store_true",
                        help="with --allow-remote-images, also fetch from private, loopback and link-local "
                             "addresses (default: public addresses only, checked at every redirect)")
    limits.add_argument("--prepare-workers", type=int, default=_D.prepare_workers,
                        help="threads that decode images and tokenize, off the engine's worker")
    limits.add_argument("--header-timeout", type=float, default=_L.header_timeout_s,
                        help="seconds for a request's head to arrive; then the connection is closed")
    limits.add_argument("--body-timeout", type=float, default=_D.body_timeout_s,
                        help="seconds for a request's body to arrive after its head; then 408")
    limits.add_argument("--keep-alive-timeout", type=int, default=_L.keep_alive_timeout_s,
                        help="seconds an idle keep-alive connection stays open")
    limits.add_argument("--limit-concurrency", type=int, default=_L.limit_concurrency,
                        help="open connections + running requests; beyond it new requests get 503")
    limits.add_argument("--sse-keepalive", type=float, default=_D.sse_keepalive_s,
                        help="seconds a stream waits for its first token before it sends its headers, and "
                             "then a `: ping` comment every so often until the token comes (idle proxies)")
    limits.add_argument("--shutdown-timeout", type=float, default=_L.shutdown_timeout_s,
                        help="on SIGTERM/SIGINT, seconds running requests may finish; then open streams end "
                             "with an error event and [DONE]")
    env_defaults(parser)


def env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str] = os.environ) -> None:
    """Every `--flag-name` of `parser` takes its default from `SPECSERVE_FLAG_NAME` when that is set
    (the Docker image is configured without editing its command); a flag on the command line still
    wins. Switches take 1/0, true/false, yes/no, on/off; lists are separated by spaces or commas. A bad
    value is reported naming its variable."""
    defaults = {}
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or action.dest == "help":
            continue
        variable = ENV_PREFIX + flags[0][2:].upper().replace("-", "_")
        if variable not in environ:
            continue
        raw = environ[variable]
        try:
            defaults[action.dest] = _env_value(action, raw)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            parser.error(f"${variable}={raw!r}: {exc}")
    parser.set_defaults(**defaults)


def _env_value(action: argparse.Action, raw: str) -> Any:
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if raw.strip().lower() not in SWITCH_VALUES:
            raise ValueError(f"not one of {', '.join(sorted(SWITCH_VALUES))}")
        on = SWITCH_VALUES[raw.strip().lower()]
        return not on if action.const is False else on  # a store_false flag stores False when given
    convert = action.type or str
    value = [convert(v) for v in raw.replace(",", " ").split()] if action.nargs in ("+", "*") else convert(raw)
    for item in value if isinstance(value, list) else [value]:
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"not one of {', '.join(map(str, action.choices))}")
    return value


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        served_model_name=tuple(args.served_model_name) if args.served_model_name else None,
        max_active=args.max_active,
        max_queue=args.max_queue,
        max_n=args.max_n,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        max_prompt_chars=args.max_prompt_chars,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        allow_remote_images=args.allow_remote_images,
        remote_image_timeout_s=args.remote_image_timeout,
        allow_private_image_hosts=args.allow_private_image_hosts,
        prepare_workers=args.prepare_workers,
        api_key=args.api_key,
        allowed_origins=tuple(args.allowed_origins),
        log_stats_interval_s=args.log_stats_interval,
        sse_keepalive_s=args.sse_keepalive,
        ui=not args.no_ui,
    )


def listen_from_args(args: argparse.Namespace) -> ListenSettings:
    return ListenSettings(
        host=args.host, port=args.port, log_level=args.log_level, header_timeout_s=args.header_timeout,
        keep_alive_timeout_s=args.keep_alive_timeout, limit_concurrency=args.limit_concurrency,
        shutdown_timeout_s=args.shutdown_timeout,
    )


def default_threads() -> int:
    """torch's default intra-op threads (one per physical core), less one if that would take every
    CPU this process may use: the event loop and the prepare pool then keep a core (on 2 shared
    cores, 2 torch threads made each step ~40x slower than 1)."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus - 1))


def engine_factory(config: Any, threads: int) -> Callable[[], Any]:
    """The app's engine factory: it runs on the worker thread, which sets its torch threads before
    the model loads (torch sizes a thread's intra-op pool when that thread first computes)."""

    def load() -> Any:
        import torch

        from ..engine import Engine

        torch.set_num_threads(threads)
        logger.info("the engine uses %d torch threads", threads)
        return Engine.from_config(config)

    return load


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, which drain the server (`--shutdown-timeout`) and exit 0. The
    model loads on the worker thread after the socket is open, so /health answers 503 until it is
    ready; a model that cannot load stops the server, which exits 1 with the reason on one line."""
    from .app import create_app
    from .transport import build_server

    logs.configure(args.log_level, args.log_format)
    failures: list[str] = []

    def load_failed(reason: str) -> None:  # on the worker thread; uvicorn polls should_exit
        failures.append(reason)
        server.should_exit = True

    load = engine_factory(engine_config(args), args.threads or default_threads())
    app = create_app(load, settings_from_args(args), on_load_failure=load_failed)
    server = build_server(app, listen_from_args(args))
    with _signals_end_quietly():
        server.run()
    if failures:
        sys.stderr.write(f"specserve: error: the model failed to load: {failures[0]}\n")
        return 1
    return 0


@contextmanager
def _signals_end_quietly() -> Iterator[None]:
    """uvicorn handles SIGINT/SIGTERM itself, then re-raises the signal to the handler it found so
    that the default action (death by signal) follows its graceful shutdown. A drained server has
    done its job, so the handler it finds here ignores the repeat and the command exits 0."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
