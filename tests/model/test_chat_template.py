"""The chat template: the documented text, markers that are single tokens, refused messages, lookup by name."""

import pytest

from palmkit.model.chat_template import chat_template, format_chat
from palmkit.model.tokenizer import CHAT_SYMBOLS

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]


def test_template_text_is_the_documented_one():
    assert format_chat(CONVERSATION) == (
        "<|system|>You are terse.<|end|>\n<|user|>Hi!<|end|>\n<|assistant|>Hello.<|end|>\n"
        "<|user|>2+2?<|end|>\n<|assistant|>")
    # Training text: a finished conversation, no open assistant turn.
    assert format_chat(CONVERSATION[:3], add_generation_prompt=False) == (
        "<|system|>You are terse.<|end|>\n<|user|>Hi!<|end|>\n<|assistant|>Hello.<|end|>\n")
    assert format_chat([]) == "<|assistant|>"


def test_markers_are_single_tokens_and_text_round_trips(tokenizer):
    text = format_chat(CONVERSATION)
    ids = tokenizer.encode(text)
    marker_ids = {tokenizer.sp.piece_to_id(s) for s in CHAT_SYMBOLS}
    assert tokenizer.sp.unk_id() not in marker_ids and len(marker_ids) == 4
    # 4 messages: 4 role markers + 4 ends + the generation prompt's assistant marker
    assert sum(i in marker_ids for i in ids) == 9
    assert ids[-1] == tokenizer.sp.piece_to_id("<|assistant|>")
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("bad", [{"role": "tool", "content": "x"}, {"content": "x"}, {"role": "user", "content": 3},
                                 {"role": "user"}])
def test_bad_messages_are_refused(bad):
    with pytest.raises(ValueError, match="message 1"):
        format_chat([CONVERSATION[1], bad])


def test_template_lookup():
    assert chat_template() is format_chat
    assert chat_template("palmkit") is format_chat
    with pytest.raises(ValueError, match="unknown chat template"):
        chat_template("chatml")
