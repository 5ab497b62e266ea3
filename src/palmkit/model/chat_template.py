"""The chat template: how a conversation becomes one prompt string.

Each message is its role marker, its content and `<|end|>`, followed by a newline; a prompt for the
next reply ends with the assistant marker, and the model answers until it writes `<|end|>`:

    <|system|>You are terse.<|end|>
    <|user|>Hi!<|end|>
    <|assistant|>

The markers are whole pieces of the tokenizer (`tokenizer.CHAT_SYMBOLS`), so each is one token and text can
never split one. The tokenizer adds BOS in front (`encode(..., bos=True)`); the template does not.

Fine-tuning trains on exactly this text with `add_generation_prompt=False`: a finished conversation ends
`<|assistant|>reply<|end|>\\n`, and the loss usually covers each assistant reply and its `<|end|>` only.
Content is not escaped: a message that contains a marker produces that marker's token, so a user can
forge a turn. Servers that take untrusted input and care should reject such content before formatting.

A checkpoint's config.json may name its template in `chat_template`; `chat_template(name)` looks it up and
falls back to this one when no name is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from palmkit.errors import PalmkitError
from palmkit.model.tokenizer import CHAT_SYMBOLS

SYSTEM, USER, ASSISTANT, END = CHAT_SYMBOLS


ROLE_MARKERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


DEFAULT_TEMPLATE = "palmkit"


def format_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation: `<|role|>content<|end|>\\n` per message, then `<|assistant|>`."""
    parts = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_MARKERS:
            raise PalmkitError(f"message {i}: role must be one of {', '.join(ROLE_MARKERS)}, got {role!r}")
        if not isinstance(content, str):
            raise PalmkitError(f"message {i}: content must be a string, got {type(content).__name__}")
        parts.append(f"{ROLE_MARKERS[role]}{content}{END}\n")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


CHAT_TEMPLATES: dict[str, Callable[..., str]] = {DEFAULT_TEMPLATE: format_chat}


def chat_template(name: str | None = None) -> Callable[..., str]:
    """The template function registered under `name` (the default template for None)."""
    name = name or DEFAULT_TEMPLATE
    if name not in CHAT_TEMPLATES:
        raise PalmkitError(f"unknown chat template {name!r}; known: {', '.join(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]
