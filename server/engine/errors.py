"""Errors the engine raises for bad requests; the HTTP layer turns them into 400 responses."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot serve as given (prompt too long, bad image, ...).

    `param` names the offending request field, as OpenAI's error body does.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
