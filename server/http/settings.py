"""Settings of the HTTP server, as frozen dataclasses built at the edge (CLI or embedding service):
`ServerSettings` for one app, `ListenSettings` for the uvicorn server `specserve serve` runs it in."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Limits and switches of one app. Every limit protects the shared worker or the process memory
    from a single client; the defaults suit a CPU box serving a few concurrent users."""

    # id(s) in /v1/models, any of which a request may name (the first is the one responses carry);
    # None or () = the engine's model name
    served_model_name: str | tuple[str, ...] | None = None
    max_active: int = 8  # sequences interleaved step by step on the worker; the rest wait
    max_queue: int = 64  # sequences waiting for a slot; beyond this new requests get 429
    retry_after_s: int = 1  # least Retry-After of a 429 (which is estimated from the drain rate)
    max_n: int = 8  # choices per request (n), and prompts x n for a batched /v1/completions
    max_tokens_limit: int | None = None  # cap on a request's max_tokens; None = the context
    default_max_tokens: int | None = None  # chat default when a request gives none; None = rest of context
    max_stop: int = 16  # stop strings per request
    max_prompt_chars: int | None = None  # text of one prompt, checked before tokenizing; None = 16 x context
    max_body_bytes: int = 32 * MiB  # request body; base64 images make chat bodies large
    body_timeout_s: float = 30.0  # the whole body must arrive within this, once the head has
    max_images: int = 4  # images per request
    max_image_bytes: int = 16 * MiB  # encoded size of one image (data URL payload or download)
    max_image_pixels: int = 4096 * 4096  # width x height of one image, checked before decoding pixels
    allow_remote_images: bool = False  # fetch http(s) image URLs (the server then makes outbound requests)
    remote_image_timeout_s: float = 10.0  # whole download of one remote image
    allow_private_image_hosts: bool = False  # remote images from private/loopback/link-local addresses too
    prepare_workers: int = 2  # threads that decode images and tokenize, off the engine's worker
    api_key: str | None = None  # required on /v1/* as `Authorization: Bearer <key>`; None = no auth
    allowed_origins: tuple[str, ...] = ()  # browser origins CORS lets call the API ("*": any); () = none
    log_stats_interval_s: float = 10.0  # seconds between stats lines while busy; 0 = none
    sse_keepalive_s: float = 5.0  # a stream without its first token by then starts with `: ping` comments
    ui: bool = True  # the playground page at / (files under /static/); False: both are 404

    @property
    def served_model_names(self) -> tuple[str, ...]:
        name = self.served_model_name
        return (name,) if isinstance(name, str) else tuple(name or ())

    def __post_init__(self) -> None:
        if any(not name for name in self.served_model_names):
            raise ValueError("a served model name must not be empty")
        positive = (
            "max_active", "max_queue", "max_n", "max_stop", "max_body_bytes", "max_images",
            "max_image_bytes", "max_image_pixels", "prepare_workers",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_tokens_limit", "default_max_tokens", "max_prompt_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string without surrounding whitespace")
        if self.sse_keepalive_s <= 0:
            raise ValueError(f"sse_keepalive_s must be > 0, got {self.sse_keepalive_s}")
        if self.log_stats_interval_s < 0:
            raise ValueError(f"log_stats_interval_s must be >= 0, got {self.log_stats_interval_s}")
        if self.retry_after_s < 0 or self.remote_image_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("retry_after_s must be >= 0, remote_image_timeout_s and body_timeout_s > 0")


@dataclass(frozen=True)
class ListenSettings:
    """The uvicorn server of `specserve serve`: address, and the limits that keep slow or numerous
    connections and a shutdown from holding the process for ever."""

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    header_timeout_s: float = 10.0  # a request's head must arrive within this (slowloris)
    keep_alive_timeout_s: int = 5  # an idle keep-alive connection is closed after this (uvicorn's)
    limit_concurrency: int = 1024  # open connections + running requests; beyond it uvicorn answers 503
    shutdown_timeout_s: float = 5.0  # on SIGTERM, running sequences get this long to finish

    def __post_init__(self) -> None:
        if self.header_timeout_s <= 0 or self.keep_alive_timeout_s < 1 or self.shutdown_timeout_s < 0:
            raise ValueError("header_timeout_s must be > 0, keep_alive_timeout_s >= 1, shutdown_timeout_s >= 0")
        if self.limit_concurrency < 1:
            raise ValueError(f"limit_concurrency must be >= 1, got {self.limit_concurrency}")
