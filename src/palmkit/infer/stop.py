"""When a generated sequence stops: one rule for `generate`, `generate_ids` and the serving engine."""

from __future__ import annotations

from collections.abc import Iterable

from palmkit.infer.sampling import SamplingParams
from palmkit.infer.text_stream import TextStream
from palmkit.model.tokenizer import Tokenizer


class StopRule:
    """Decides, token by token, whether one sequence has finished, and what text it may show so far.

    Checked in this order on each new token:
    1. a stop id ends it with "stop": with `params.stop_at_eos`, EOS and, given a tokenizer, its other
       `stop_ids` (the chat template's end of turn, which exported models stop at too); and `stop_ids`; the stop
       token is counted but never shown;
    2. a stop string completed in the text ends it with "stop" (needs a tokenizer; the text is cut before it);
    3. `params.max_new_tokens` tokens, or a full context, end it with "length".
    Without a tokenizer only the token rules apply (`generate_ids`, which has no text).
    """

    def __init__(self, params: SamplingParams, eos_id: int, prompt_len: int, context: int,
                 tokenizer: Tokenizer | None = None, stop_ids: Iterable[int] = ()):
        ends = {eos_id, *(tokenizer.stop_ids if tokenizer is not None else ())}
        self.stop_ids = frozenset(stop_ids) | (ends if params.stop_at_eos else frozenset())
        # The last token is sampled from the logits at position context - 1 and never fed back, so a prompt
        # of n tokens leaves room for context - n + 1 new ones.
        self.limit = min(params.max_new_tokens, context - prompt_len + 1)
        self.stream = TextStream(tokenizer, params.stop) if tokenizer is not None else None
        self.count = 0
        self.finish: str | None = None  # "stop" or "length" once finished

    def push(self, token: int) -> str:
        """Count a new token; return the text now safe to show (all that was held back, once finished)."""
        self.count += 1
        if token in self.stop_ids:
            self.finish = "stop"
            return self.stream.finish() if self.stream else ""
        text = self.stream.push(token) if self.stream else ""
        if self.stream is not None and self.stream.stopped:
            self.finish = "stop"
        elif self.count >= self.limit:
            self.finish = "length"
            text += self.stream.finish() if self.stream else ""
        return text
