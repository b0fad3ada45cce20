"""Token ids to text while streaming: incremental decoding and OpenAI ``stop`` strings."""

from __future__ import annotations

from typing import Any


class TextStream:
    """The text of one choice as its tokens arrive.

    :meth:`push` returns the new text since the last call. A trailing U+FFFD
    (an incomplete multi-byte character) is held back until the next token
    completes it. A ``stop`` string ends the choice; the text up to it (never
    the stop string itself) is what the client sees, as in OpenAI's API.
    """

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; returns the text to send now (possibly empty). Sets :attr:`stopped` on a stop string."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back, at the end of the choice."""
        return "" if self.stopped else self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self._text()
        for s in self.stop:
            at = text.find(s, max(0, len(self.sent) - len(s)))
            if at != -1:
                text, self.stopped = text[:at], True
        if not final and not self.stopped:
            text = text.rstrip("\ufffd")
            # keep back a tail that could be the start of a stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        if not text.startswith(self.sent):  # a re-tokenised prefix changed: send only what is new
            text = self.sent + text[len(self.sent):]
        delta = text[len(self.sent):]
        self.sent = text
        return delta

    @property
    def text(self) -> str:
        """Everything sent so far."""
        return self.sent
