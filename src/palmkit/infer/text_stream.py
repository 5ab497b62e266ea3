"""Incremental detokenisation with stop strings: text is released only once no stop string can start in it."""

from __future__ import annotations

from collections.abc import Sequence

from palmkit.model.tokenizer import Tokenizer


class TextStream:
    """Turns a growing list of token ids into safe text deltas.

    Holds back an incomplete UTF-8 character (byte-fallback pieces arrive one byte at a time) and any
    tail that could still become a stop string, and reports when a stop string completes.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stopped = False
        # Decoding every id again for each new one costs O(n) a token; instead only a window is decoded: the ids
        # since the last complete character, after one earlier id so that a leading-space rule applies to the
        # earlier id in both decodes and their difference is exactly the new text (as vLLM and TGI detokenise)
        self._decoded = ""  # the text of ids[: self._read]
        self._window = self._read = 0  # ids[self._window: self._read] were decoded last

    def push(self, token_id: int) -> str:
        """Add a token; return text that is now safe to show."""
        self.ids.append(token_id)
        return self._emit(final=False)

    def finish(self) -> str:
        """Flush what was held back at the end of generation."""
        return self._emit(final=True)

    def _extend(self, final: bool) -> None:
        """Decode the ids past self._read into self._decoded, unless they end inside a multi-byte character."""
        if self._read == len(self.ids):
            return
        known = self.tokenizer.decode(self.ids[self._window: self._read])
        text = self.tokenizer.decode(self.ids[self._window:])
        if not final and text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for its next byte
        self._decoded += text[len(known):]
        self._window, self._read = self._read, len(self.ids)

    def _emit(self, final: bool) -> str:
        if self.stopped:
            return ""
        self._extend(final)
        text = self._decoded
        for s in self.stop:
            at = text.find(s, self.sent)
            if at != -1:
                self.stopped = True
                delta, self.sent = text[self.sent:at], at
                return delta
        end = len(text)
        if not final:
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if text.endswith(s[:k], 0, end):
                        hold = max(hold, k)
                        break
            end -= hold
        delta, self.sent = text[self.sent:end], end
        return delta

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)[: self.sent] if self.stopped else self.tokenizer.decode(self.ids)
