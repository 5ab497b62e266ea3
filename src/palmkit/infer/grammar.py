"""Structured output: a grammar per request, compiled by llguidance, that masks the tokens it cannot continue with.

A request may constrain its completion to one of four kinds (`Constraint`): any JSON object (`json_object`),
JSON valid against a schema (`json_schema`), a regular expression (`regex`, Rust's regex syntax) or one of a
list of strings (`choice`). `compile_grammar` turns it into llguidance's grammar text once (a schema llguidance
cannot compile raises `GrammarError`, which a server answers with 400), and each sequence gets its own
`Matcher`, which gives the mask of allowed tokens for its state and advances with each accepted token.

llguidance (Microsoft's engine behind guidance; vLLM and llama.cpp use it too) works on the bytes of each token,
so SentencePiece's byte-fallback vocabulary maps directly: a byte piece `<0xNN>` is that byte, any other piece
its text with SentencePiece's `▁` written as a space, and control pieces (BOS, EOS, the chat markers) are special
tokens, which the grammar's text can never produce. The mask lets a stop id through only once the grammar is
complete, so a constrained completion ends with EOS (or the chat's end of turn) right after its last character.
JSON is compiled without free whitespace: a model that likes spaces could otherwise fill its budget with them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import torch

from palmkit.errors import PalmkitError
from palmkit.model.tokenizer import CHAT_SYMBOLS, Tokenizer

Kind = Literal["json_object", "json_schema", "regex", "choice", "lark"]

# compact JSON (no optional whitespace), every keyword llguidance does not implement refused rather than ignored
JSON_OPTIONS = {"whitespace_flexible": False, "lenient": False}


class GrammarError(PalmkitError):
    """A constraint that the grammar engine cannot compile (an unsupported schema keyword, an invalid regex)."""


@dataclass(frozen=True)
class Constraint:
    """What a completion must match: `spec` is a JSON schema (dict) for json_schema, a pattern for regex, a list
    of strings for choice, a grammar in llguidance's Lark dialect for lark, and None for json_object."""

    kind: Kind
    spec: Any = None

    def grammar_text(self) -> str:
        """llguidance's grammar for this constraint (not yet checked)."""
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.spec, overrides=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            return llguidance.LLMatcher.grammar_from_regex("|".join(_literal(c) for c in self.spec))
        if self.kind == "lark":  # llguidance's Lark dialect (`%json {schema}` embeds a schema)
            return llguidance.LLMatcher.grammar_from_lark(self.spec)
        raise GrammarError(f"unknown constraint kind {self.kind!r}")


def _literal(text: str) -> str:
    """A regex matching exactly `text`: every character but letters and digits escaped by its code point."""
    return "(?:" + "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):x}}}" for c in text) + ")"


class _Vocabulary:
    """What llguidance reads of a tokenizer (llguidance.TokenizerWrapper's duck type): each token's bytes, EOS, BOS,
    and a function that tokenizes bytes."""

    def __init__(self, tokenizer: Tokenizer):
        sp = tokenizer.sp
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.tokens: list[bytes] = [_token_bytes(sp, i) for i in range(sp.get_piece_size())]
        self.special_token_ids = [i for i in range(sp.get_piece_size()) if self.tokens[i].startswith(b"\xff")]
        self._sp = sp

    def __call__(self, data: bytes) -> list[int]:
        return self._sp.encode(data.decode("utf-8", errors="replace"))


def _token_bytes(sp, i: int) -> bytes:
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):
        return bytes([int(piece[3:-1], 16)])
    if sp.is_control(i) or sp.is_unknown(i) or piece in CHAT_SYMBOLS:
        return b"\xff" + piece.encode()  # llguidance's mark of a special token: no text can produce it
    return piece.replace("\u2581", " ").encode()


@functools.lru_cache(maxsize=4)
def ll_tokenizer(tokenizer: Tokenizer, stop_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of a tokenizer, with `stop_ids` as the tokens that end a complete output (about a second
    for a 32k vocabulary: cached)."""
    wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer))
    return llguidance.LLTokenizer(wrapper, eos_token=list(stop_ids))


@functools.lru_cache(maxsize=256)
def _checked(grammar: str) -> str:
    error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if error:
        raise GrammarError(messages[0] if messages else "invalid grammar")
    return grammar


def compile_grammar(constraint: Constraint) -> str:
    """The constraint's grammar text, checked; raises GrammarError for one llguidance cannot compile."""
    if constraint.kind == "choice" and (not constraint.spec or not all(isinstance(c, str) for c in constraint.spec)):
        raise GrammarError("choice needs a non-empty list of strings")
    if constraint.kind == "regex" and not isinstance(constraint.spec, str):
        raise GrammarError("regex needs a pattern string")
    try:
        text = constraint.grammar_text()
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from None
    return _checked(text)


class Matcher:
    """One sequence's place in its grammar: the mask of tokens allowed next, advanced by each accepted token."""

    def __init__(self, grammar: str, tokenizer: llguidance.LLTokenizer):
        self._m = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.vocab = tokenizer.vocab_size  # the width of its masks, in tokens
        if self._m.is_error():
            raise GrammarError(self._m.get_error())

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bits into row `row` of an int32 bitmask (B, ceil(V / 32)) on the CPU."""
        v = bitmask[row]
        self._m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def accept(self, token: int) -> None:
        """Advance by a sampled token (always one the mask allowed)."""
        self._m.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and can take nothing more but a stop token."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()


def new_bitmask(rows: int, vocab: int) -> torch.Tensor:
    """An all-allowed int32 bitmask for `rows` rows of a `vocab`-token vocabulary."""
    return torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)


@functools.cache
def _bits(device: torch.device) -> torch.Tensor:
    return 1 << torch.arange(32, dtype=torch.int32, device=device)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` (B, V) with every token whose bit is 0 in `bitmask` (B, ceil(V / 32)) set to -inf (in place)."""
    allowed = (bitmask.to(logits.device)[:, :, None] & _bits(logits.device)) != 0
    allowed = allowed.reshape(bitmask.shape[0], -1)[:, : logits.shape[-1]]
    return logits.masked_fill_(~allowed, float("-inf"))


def matchers(constraints: Sequence[Constraint | None], tokenizer: Tokenizer,
             stop_ids: Sequence[int]) -> list[Matcher | None]:
    """A fresh matcher per constrained choice (None for the unconstrained); `stop_ids` end a complete output."""
    if all(c is None for c in constraints):
        return [None] * len(constraints)
    ll = ll_tokenizer(tokenizer, tuple(sorted(set(stop_ids))))
    return [None if c is None else Matcher(compile_grammar(c), ll) for c in constraints]
