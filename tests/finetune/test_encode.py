"""Encoding examples: tags on each word's first piece, Chinese per character, truncation, echo, chat loss mask."""

from palmkit.finetune.encode import align_words, chat_item
from palmkit.model.chat_template import format_chat

# --------------------------------------------------------------------------------------------------
# Alignment of tags to pieces


def test_bio_tags_go_on_the_first_piece_of_each_word(tokenizer):
    words = ["The", "Zyqxwvut", "jumps", "over", "Berlinerstrasse"]
    tags = [0, 1, 0, 0, 3]
    item = align_words(tokenizer, words, tags, max_len=64)
    per_word = [tokenizer.encode(w if i == 0 else " " + w) for i, w in enumerate(words)]
    assert any(len(p) > 1 for p in per_word)  # some words really are several pieces
    assert item.ids == [t for p in per_word for t in p]
    assert item.ids == tokenizer.encode(" ".join(words))  # same pieces as the running text
    expected = []
    for p, tag in zip(per_word, tags, strict=True):
        expected += [tag] + [-100] * (len(p) - 1)
    assert item.target == expected
    assert [item.ids[f] for f in item.words] == [p[0] for p in per_word]


def test_chinese_is_tagged_per_character(tokenizer):
    chars = list("江泽民在北京")
    item = align_words(tokenizer, chars, [5, 6, 6, 0, 1, 2], max_len=64, char_level=True)
    per_char = [tokenizer.encode(c) for c in chars]
    assert item.ids == [t for p in per_char for t in p]
    labelled = [t for t in item.target if t != -100]
    assert labelled == [5, 6, 6, 0, 1, 2]  # one label per character, on its first piece
    assert sum(len(p) for p in per_char) == len(item.target)


def test_truncated_words_and_echo(tokenizer):
    words = ["one", "two", "three", "four"]
    short = align_words(tokenizer, words, [1, 0, 0, 1], max_len=3)
    assert len(short.ids) <= 3 and short.words[-1] == -1  # cut-off words are marked, predicted O later
    echo = align_words(tokenizer, words, [1, 0, 0, 1], max_len=64, echo=True)
    plain = align_words(tokenizer, words, [1, 0, 0, 1], max_len=64)
    n = len(plain.ids)
    assert echo.ids == plain.ids * 2
    assert echo.target == [-100] * n + plain.target  # tagged on the copy that has read the whole sentence
    assert echo.words == [w + n for w in plain.words]


# --------------------------------------------------------------------------------------------------
# Chat loss mask


def test_chat_loss_covers_exactly_the_assistant_replies(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi, how can I help?"},
                {"role": "user", "content": "Tell me a fact"}, {"role": "assistant", "content": "Foxes jump."}]
    item = chat_item(tokenizer, messages, max_len=256)
    full = tokenizer.encode(format_chat(messages, add_generation_prompt=False), bos=True)
    assert item.ids == full[:-1]
    # Reference mask from the marker tokens: after each <|assistant|> up to and including its <|end|>.
    assistant, end = tokenizer.sp.piece_to_id("<|assistant|>"), tokenizer.sp.piece_to_id("<|end|>")
    inside, expected = False, []
    for tok in full:
        expected.append(inside)
        if tok == assistant:
            inside = True
        elif tok == end:
            inside = False
    trained = [i for i, t in enumerate(item.target) if t != -100]
    assert [i + 1 for i in trained] == [i for i, m in enumerate(expected) if m]
    assert all(item.target[i] == full[i + 1] for i in trained)
    assert tokenizer.decode(full[i + 1] for i in trained) == "Hi, how can I help?<|end|>Foxes jump.<|end|>"
