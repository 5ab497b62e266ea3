"""The chat template: how a conversation becomes one prompt string.

Each message is its role marker, its content and `<|end|>`, followed by a newline; a prompt for the
next reply ends with the assistant marker, and the model answers until it writes `<|end|>`:

    <|system|>You are terse.<|end|>
    <|user|>Hi!<|end|>
    <|assistant|>

The markers are whole pieces of the tokenizer (`tokenizer.CHAT_SYMBOLS`), so each is one token and text can
never split one. `encode_chat` gives the ids: BOS (by the tokenizer's BOS rule), then the template's text with its
markers as tokens and each message's content as plain text (`Tokenizer.encode_plain`): a marker typed inside a
message stays letters, so no one can forge a turn. `jinja_template` is the same template for transformers'
`apply_chat_template` (the exported tokenizer_config.json carries it); it cuts marker names inside content the
same way, so the exported tokenizer gives the same ids.

Fine-tuning trains on exactly this text with `add_generation_prompt=False`: a finished conversation ends
`<|assistant|>reply<|end|>\\n`, and the loss usually covers each assistant reply and its `<|end|>` only.

A checkpoint's config.json may name its template in `chat_template`; `chat_template(name)` looks it up and
falls back to this one when no name is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from palmkit.errors import PalmkitError
from palmkit.model.tokenizer import CHAT_SYMBOLS, SPECIAL_PIECES, Tokenizer

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


# Stands in for each message's content while the template is rendered, so that the rendered text says where
# content starts and ends whatever the content holds.
_SLOT = "\x00palmkit-content-{}\x00"
_SLOT_RE = re.compile("\x00palmkit-content-(\\d+)\x00")


def chat_pieces(messages: Sequence[dict], add_generation_prompt: bool = True,
                template: Callable[..., str] = format_chat) -> list[tuple[str, int | None]]:
    """The rendered conversation as (text, message index) pairs: template text has index None, a message's
    content its index. Joined, the texts are `template(messages, add_generation_prompt)`."""
    slots = [{**m, "content": _SLOT.format(i)} if isinstance(m, dict) and isinstance(m.get("content"), str) else m
             for i, m in enumerate(messages)]
    rendered = template(slots, add_generation_prompt=add_generation_prompt)
    parts = _SLOT_RE.split(rendered)  # text, index, text, index, ..., text
    out: list[tuple[str, int | None]] = []
    for k, part in enumerate(parts):
        if k % 2:
            out.append((messages[int(part)]["content"], int(part)))
        elif part:
            out.append((part, None))
    return out


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                template: Callable[..., str] = format_chat) -> list[int]:
    """Ids of a conversation: BOS by the tokenizer's rule, the template's markers as tokens, content as text."""
    return [tokenizer.bos_id] * tokenizer.add_bos + [
        i for text, index in chat_pieces(messages, add_generation_prompt, template)
        for i in (tokenizer.encode(text) if index is None else tokenizer.encode_plain(text))]


CONTENT_CUT = "\ufdd0"  # a Unicode noncharacter: never meant to occur in interchanged text


def _escaped_content() -> str:
    """A Jinja expression of message content with each control name cut after its "<" by U+FDD0, which the exported
    tokenizer's pre-tokenizer splits on and drops: the cut `Tokenizer.encode_plain` makes."""
    expr = "message['content']"
    for name in (*CHAT_SYMBOLS, *SPECIAL_PIECES):
        expr += f" | replace('{name}', '<{CONTENT_CUT}{name[1:]}')"
    return expr


def jinja_template(add_bos: bool, cut_markers: bool = True) -> str:
    """`format_chat` as a Jinja chat template for transformers (`bos_token` first when `add_bos`).

    `cut_markers`: cut control names inside content as `encode_plain` does (for the transformers export, whose
    tokenizer drops the cut); False writes content as it is (for llama.cpp, which has no such tokenizer step)."""
    content = _escaped_content() if cut_markers else "message['content']"
    roles = ", ".join(f"'{r}': '{m}'" for r, m in ROLE_MARKERS.items())
    return (
        ("{{ bos_token }}" if add_bos else "")
        + "{%- set markers = {" + roles + "} -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in markers -%}"
        "{{ raise_exception('role must be one of " + ", ".join(ROLE_MARKERS) + "') }}"
        "{%- endif -%}"
        "{{ markers[message['role']] }}{{ " + content + " }}{{ '" + END + "\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
    )
