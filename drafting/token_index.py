"""Token documents indexed by their n-grams: where the current context occurred before, and how well.

One `TokenIndex` serves both halves of the suffix drafter (`suffix.py`): a session's own text (one
growing document) and the proposer's store of past outputs (many finished documents, bounded by
`max_tokens`, least recently used evicted first). Every n-gram (n = 1..max_n) of every document is
indexed by where it ends. `matches(context)` takes the longest suffix n-gram of the context that
occurs anywhere and reports each occurrence with its *match length*: how many tokens before it agree
with the context (counted past max_n, up to `max_match`), which is what a suffix tree's depth gives.

Worked example (max_n=2): documents 0 = "a b c e", 1 = "x b c d"; context "x b c"
    longest suffix found: "b c" (2 tokens), ending at position 2 of doc 1 and of doc 0
    doc 1: before "b c" comes "x", as in the context -> match length 3
    doc 0: before "b c" comes "a", the context has "x" -> match length 2
    matches -> [Match(doc=1, end=2, length=3), Match(doc=0, end=2, length=2)]  (newest document first)

Memory: a token costs max_n index entries (about 1 KB in CPython at max_n=4), hence the token bound.
Not thread-safe: the engine drives all sessions from one worker thread.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Match:
    doc: int
    end: int  # position of the match's last token in the document
    length: int  # tokens that agree with the context, ending at `end`


class TokenIndex:
    def __init__(self, max_n: int, max_tokens: int | None = None, max_match: int = 32) -> None:
        self.max_n = max_n
        self.max_tokens = max_tokens  # None: unbounded (a session's own text)
        self.max_match = max_match
        self.docs: OrderedDict[int, list[int]] = OrderedDict()  # least recently used first
        self.ends: dict[tuple[int, ...], dict[int, list[int]]] = {}  # n-gram -> doc -> end positions
        self.num_tokens = 0
        self.evicted = 0  # documents evicted so far

    def extend(self, doc: int, tokens: list[int]) -> None:
        """Append `tokens` to document `doc` (created if new) and index them; evicts other documents
        while the index holds more than `max_tokens` (a document alone longer than that keeps its tail)."""
        if self.max_tokens is not None and len(tokens) > self.max_tokens:
            tokens = tokens[-self.max_tokens:]
        text = self.docs.setdefault(doc, [])
        for token in tokens:
            text.append(token)
            end = len(text) - 1
            for n in range(1, min(self.max_n, end + 1) + 1):
                self.ends.setdefault(tuple(text[end - n + 1 : end + 1]), {}).setdefault(doc, []).append(end)
        self.num_tokens += len(tokens)
        while self.max_tokens is not None and self.num_tokens > self.max_tokens and len(self.docs) > 1:
            self.remove(next(d for d in self.docs if d != doc))
            self.evicted += 1

    def remove(self, doc: int) -> None:
        text = self.docs.pop(doc)
        self.num_tokens -= len(text)
        for end in range(len(text)):
            for n in range(1, min(self.max_n, end + 1) + 1):
                key = tuple(text[end - n + 1 : end + 1])
                by_doc = self.ends[key]
                by_doc.pop(doc, None)
                if not by_doc:
                    del self.ends[key]

    def touch(self, doc: int) -> None:
        """Mark `doc` as recently used (it helped a draft), so it is evicted last."""
        self.docs.move_to_end(doc)

    def clear(self) -> None:
        self.docs.clear()
        self.ends.clear()
        self.num_tokens = 0

    def matches(self, context: list[int], limit: int) -> list[Match]:
        """Up to `limit` occurrences of the longest suffix n-gram of `context` that occurs, newest
        document and latest position first. An occurrence at the very end of a document has nothing
        after it, so it is skipped (the context's own position, for a session's text)."""
        for n in range(min(self.max_n, len(context)), 0, -1):
            by_doc = self.ends.get(tuple(context[-n:]))
            if not by_doc:
                continue
            found = []
            for doc in reversed(by_doc):
                text = self.docs[doc]
                for end in reversed(by_doc[doc]):
                    if end + 1 < len(text):
                        found.append(Match(doc, end, self._match_length(text, end, context, n)))
                        if len(found) == limit:
                            return found
            if found:
                return found
        return []

    def continuation(self, match: Match, length: int) -> list[int]:
        """The (up to) `length` tokens that followed `match` in its document."""
        return self.docs[match.doc][match.end + 1 : match.end + 1 + length]

    def _match_length(self, text: list[int], end: int, context: list[int], known: int) -> int:
        """Agreeing tokens ending at `end`, of which the last `known` are already known to agree."""
        length = known
        limit = min(self.max_match, end + 1, len(context))
        while length < limit and text[end - length] == context[-1 - length]:
            length += 1
        return length
