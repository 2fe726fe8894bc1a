"""Text as tokens arrive: incremental decoding and stop strings, without re-decoding the whole output.

A round appends several tokens to a request. Decoding all of its tokens every round costs
O(length) a round, O(length²) a request; instead :class:`IncrementalText` decodes only a
short window: the tokens since the last text it emitted plus the few before them (a token's
text can depend on its neighbours: byte-level BPE splits multi-byte characters across tokens,
SentencePiece drops a leading space at the start of a decode). Text that ends in an
incomplete character (U+FFFD) is held back until the character completes.

:class:`StopFinder` looks for stop strings only in the text a round's tokens could have
completed: the new text plus the ``longest stop string − 1`` characters before it.
:class:`TextStream` releases a streamed request's text: whole characters, and nothing that
a stop string could still cut.
"""

from __future__ import annotations

from typing import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class IncrementalText:
    """A request's generated text, decoded as its tokens arrive.

    ``prefix_offset..read_offset`` is the window of tokens already turned into text that
    the next decode re-reads for context; ``read_offset`` is where the not-yet-emitted
    tokens start. ``text`` is everything emitted so far."""

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def extend(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the text they complete ("" while a character is incomplete)."""
        self.ids.extend(new_ids)
        before = self.decode(self.ids[self.prefix_offset: self.read_offset])
        window = self.decode(self.ids[self.prefix_offset:])
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return ""
        new = window[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += new
        return new

    def flush(self) -> str:
        """At the end of a request: the text still held back (an incomplete character)."""
        full = self.decode(self.ids)
        rest = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        self.prefix_offset = self.read_offset = len(self.ids)
        return rest


class StopFinder:
    """Finds a request's stop strings as its tokens arrive."""

    def __init__(self, stop: Sequence[str], decode: Decode) -> None:
        self.stop = tuple(stop)
        self.decode = decode
        self.longest = max(map(len, self.stop))
        self.text = IncrementalText(decode)

    def find(self, token_ids: list[int], new: int) -> tuple[int, int] | None:
        """``token_ids``: the request's generated ids, the last ``new`` of them just added.
        Returns (tokens to keep, characters of text to keep) at the earliest stop string, or
        None. The kept tokens are the fewest whose text contains the stop string; the kept
        text ends where the stop string begins."""
        seen = len(self.text.text)
        inc = self.text
        inc.extend(token_ids[len(token_ids) - new:])
        text = inc.text
        if inc.read_offset < len(inc.ids):  # tokens held back (an incomplete character): their text counts too
            before = self.decode(inc.ids[inc.prefix_offset: inc.read_offset])
            text += self.decode(inc.ids[inc.prefix_offset:])[len(before):]
        start = max(0, seen - self.longest + 1)
        if not any(text.find(s, start) >= 0 for s in self.stop):
            return None
        # A hit: settle it exactly on the decoded output (once per request).
        if not any(s in self.decode(token_ids) for s in self.stop):
            return None
        lo, hi = 1, len(token_ids)
        while lo < hi:  # binary search: decoded prefixes grow monotonically
            mid = (lo + hi) // 2
            if any(s in self.decode(token_ids[:mid]) for s in self.stop):
                hi = mid
            else:
                lo = mid + 1
        # The earliest stop in the fewest tokens that hold one, as a token-by-token decode
        # would find it: not in the whole round's text, whose grouping depends on the drafts.
        prefix = self.decode(token_ids[:lo])
        return lo, min(prefix.find(s) for s in self.stop if s in prefix)


class TextStream:
    """The text of a streamed request, released as tokens arrive: whole characters only
    (:class:`IncrementalText`), and never text that could still become a stop string."""

    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self.text = IncrementalText(decode)
        self.stop = tuple(stop)
        self.sent = 0  # characters released

    def update(self, token_ids: Sequence[int]) -> str:
        """``token_ids``: the request's ids so far. Returns the newly released text."""
        self.text.extend(token_ids[len(self.text.ids):])
        text = self.text.text
        safe = len(text) - self._held(text)
        out = text[self.sent: safe]
        self.sent = max(self.sent, safe)
        return out

    def finish(self, final_text: str) -> str:
        """The request ended with ``final_text`` (stop string cut): release the rest."""
        out = final_text[self.sent:]
        self.sent = len(final_text)
        return out

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` that begin some stop string."""
        for n in range(min(max(map(len, self.stop), default=1) - 1, len(text)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0
