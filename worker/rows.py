"""Per-request decoding state inside a running batch: tokens, stop rules and text deltas.

Pure logic over a ``decode(ids) -> str`` function, so it is tested without a model. The text a
client receives as deltas is, by construction, exactly the final text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class RowState:
    """One request's progress in a batch."""

    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    tokens: list[int] = field(default_factory=list)
    emitted: str = ""
    """Text already handed out as deltas."""
    finish_reason: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int, decode: Callable[[Sequence[int]], str], now: float) -> str:
        """Take the next token; return the new text delta (maybe empty)."""
        if self.done:
            return ""
        if self.first_token_at is None:
            self.first_token_at = now
        if token in self.eos_ids and not self.ignore_eos:
            return self._finish("stop", decode(self.tokens), now)
        self.tokens.append(token)
        text = decode(self.tokens)
        cut = _find_stop(text, self.stop)
        if cut is not None:
            return self._finish("stop", text[:cut], now)
        if len(self.tokens) >= self.max_new_tokens:
            return self._finish("length", text, now)
        return self._delta(_stable_prefix(text, self.stop))

    def cancel(self, decode: Callable[[Sequence[int]], str], now: float) -> str:
        """Stop the request at once; the text so far stays its text."""
        if self.done:
            return ""
        return self._finish("cancelled", decode(self.tokens), now)

    def _finish(self, reason: str, text: str, now: float) -> str:
        self.finish_reason = reason
        self.finished_at = now
        return self._delta(text, final=True)

    def _delta(self, text: str, final: bool = False) -> str:
        # Decoding is prefix-stable for byte-level tokenizers; if a tokenizer ever rewrites
        # earlier text, the client keeps what it saw and only new text is appended.
        if not text.startswith(self.emitted):
            return ""
        delta = text[len(self.emitted):]
        if not final:
            delta = delta.rstrip(REPLACEMENT_CHAR)
        self.emitted += delta
        return delta


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stable_prefix(text: str, stops: tuple[str, ...]) -> str:
    """Text minus a tail that could still become a stop string (it must not be sent yet)."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return text[: len(text) - hold] if hold else text
