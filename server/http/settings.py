"""Settings of the HTTP server: one frozen dataclass, built at the edge (CLI or embedding service)."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Limits and switches of one app. Every limit protects the shared worker or the process memory
    from a single client; the defaults suit a CPU box serving a few concurrent users."""

    served_model_name: str | None = None  # id in /v1/models; None = the engine's model name
    max_active: int = 8  # sequences interleaved step by step on the worker; the rest wait
    max_queue: int = 64  # sequences waiting for a slot; beyond this new requests get 429
    retry_after_s: int = 1  # the Retry-After header of a 429
    max_n: int = 8  # choices per request (n), and prompts x n for a batched /v1/completions
    max_tokens_limit: int | None = None  # cap on a request's max_tokens; None = the context
    default_max_tokens: int | None = None  # chat default when a request gives none; None = rest of context
    max_stop: int = 16  # stop strings per request
    max_body_bytes: int = 32 * MiB  # request body; base64 images make chat bodies large
    max_images: int = 4  # images per request
    max_image_bytes: int = 16 * MiB  # encoded size of one image (data URL payload or download)
    max_image_pixels: int = 4096 * 4096  # width x height of one image, checked before decoding pixels
    allow_remote_images: bool = False  # fetch http(s) image URLs (the server then makes outbound requests)
    remote_image_timeout_s: float = 10.0  # whole download of one remote image

    def __post_init__(self) -> None:
        positive = (
            "max_active", "max_queue", "max_n", "max_stop", "max_body_bytes", "max_images",
            "max_image_bytes", "max_image_pixels",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_tokens_limit", "default_max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.retry_after_s < 0 or self.remote_image_timeout_s <= 0:
            raise ValueError("retry_after_s must be >= 0 and remote_image_timeout_s > 0")
