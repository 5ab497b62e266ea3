"""Log-probabilities in OpenAI's two shapes.

Legacy completions (`logprobs: N`, also with `echo`) answer four parallel lists::

    {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...], "text_offset": [...]}

where each `top_logprobs` entry holds the N most likely tokens and the chosen one (so up to N + 1), and an echoed
prompt's first token has `null` in both: nothing precedes it to predict it from. Chat (`logprobs: true`,
`top_logprobs: N`) answers `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
"bytes"}]}], "refusal": null}`. A token is named by its text; a piece of a UTF-8 character (SentencePiece's byte
fallback) as `bytes:\\xNN`, as OpenAI names such tokens, and every name with `return_tokens_as_token_ids` as
`token_id:ID`, as vLLM does.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from functools import lru_cache

from palmkit.infer.sampling import TokenLogprob
from palmkit.model.tokenizer import Tokenizer

# (token id, its log-probability); None for an echoed prompt's first token
Entry = tuple[int, TokenLogprob | None]


class TokenNames:
    """How tokens are written in responses: their UTF-8 bytes and their names."""

    def __init__(self, tokenizer: Tokenizer, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids
        self.bytes = lru_cache(maxsize=None)(self._bytes)

    def _bytes(self, token: int) -> bytes:
        """What the token adds to the decoded text (nothing for BOS, EOS and padding)."""
        sp = self.tokenizer.sp
        if sp.is_byte(token):  # the piece is "<0xNN>"
            return bytes([int(sp.id_to_piece(token)[3:-1], 16)])
        return self.tokenizer.decode([token]).encode()

    def name(self, token: int) -> str:
        if self.as_ids:
            return f"token_id:{token}"
        data = self.bytes(token)
        if not data and self.tokenizer.sp.is_control(token):
            return self.tokenizer.piece(token)  # "<s>", "</s>": shown although they add no text
        try:
            return data.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def prompt_entries(prompt: Sequence[int], logprobs: Sequence[TokenLogprob] | None) -> list[Entry]:
    """An echoed prompt's entries: its first token has no log-probability."""
    return [(prompt[0], None), *zip(prompt[1:], logprobs or [None] * (len(prompt) - 1), strict=True)]


class LegacyLogprobs:
    """The legacy completions' lists for one choice, built chunk by chunk so that offsets run on across a stream."""

    def __init__(self, names: TokenNames):
        self.names = names
        self.chars = 0  # characters of text before the next token
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, entries: Sequence[Entry]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp in entries:
            name = self.names.name(token)
            out["tokens"].append(name)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            # the chosen token is always among them, as OpenAI answers
            out["top_logprobs"].append(None if lp is None else {
                **{self.names.name(t): v for t, v in lp.top}, name: lp.logprob})
            data = self.names.bytes(token)
            if self._utf8.getstate()[0] and not (data and 0x80 <= data[0] < 0xC0):
                # a character cut off by this token: its replacement mark belongs to the tokens before
                self.chars += len(self._utf8.decode(b"", final=True))
            out["text_offset"].append(self.chars)
            self.chars += len(self._utf8.decode(data))
        return out


def chat_logprobs(names: TokenNames, entries: Sequence[Entry]) -> dict:
    """The chat form: one `content` item per token."""

    def item(token: int, logprob: float) -> dict:
        return {"token": names.name(token), "logprob": logprob, "bytes": list(names.bytes(token))}

    content = [{**item(token, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
               for token, lp in entries if lp is not None]
    return {"content": content, "refusal": None}


class JsonLists:
    """An object of JSON lists (`keys`) built chunk by chunk as text, for a response too large to hold as Python
    objects: an echoed prompt's log-probabilities are millions of dicts, lists and floats, and every full
    collection of the cyclic garbage collector scans each one while it holds the interpreter (0.8 s for one
    10 MB response, every route stalled). Text is never scanned."""

    def __init__(self, keys: Sequence[str], tail: str = ""):
        self.parts: dict[str, list[str]] = {k: [] for k in keys}
        self.tail = tail  # more members, as JSON text: ',"refusal":null'

    def add(self, chunk: dict) -> None:
        for key, values in chunk.items():
            if key in self.parts and values:
                self.parts[key].append(json.dumps(values, ensure_ascii=False, allow_nan=False,
                                                  separators=(",", ":"))[1:-1])

    def text(self) -> str:
        return "{" + ",".join(f'"{k}":[{",".join(p)}]' for k, p in self.parts.items()) + self.tail + "}"
