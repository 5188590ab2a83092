"""Incremental detokenization: text deltas for tokens as they arrive, several per step.

Decoding each new token alone loses the spaces and merges that depend on its neighbours, and decoding
the whole output every step is quadratic. Like TGI's `decode_token`, this decodes a short window:
`prefix_offset..read_offset` is text already returned (context only), `read_offset..` is new. A delta
that ends in U+FFFD is a partial UTF-8 character (a byte-level token split a multi-byte character), so
it is held back until the next token completes it.
"""

from __future__ import annotations

# Prompt tokens decoded as context for the first output token (for a correct leading space).
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        new_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]
