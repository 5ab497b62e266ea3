"""The SentencePiece tokenizer: exact round trips, split digits, special ids, byte fallback, clear file errors."""

import pytest

from palmkit.model.tokenizer import CHAT_SYMBOLS, Tokenizer

SAMPLES = [
    "Hello, world! The year 2024 had 366 days.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "素早い茶色の狐がのろまな犬を飛び越える。",
    "Быстрая коричневая лиса",
    "emoji 😀🚀 and a rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 word",
    "tabs\tand\t\ttabs\nnew\n\nlines   runs of    spaces  ",
    " leading space",
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_are_split(tokenizer):
    pieces = [tokenizer.piece(i) for i in tokenizer.encode("12345")]
    assert pieces == ["1", "2", "3", "4", "5"]


def test_special_ids_and_chat_symbols(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    ids = tokenizer.encode("<|user|>hi<|end|>", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.piece(ids[1]) == "<|user|>" and tokenizer.piece(ids[-2]) == "<|end|>"
    assert len(CHAT_SYMBOLS) == 4


def test_byte_fallback_for_unseen_script(tokenizer):
    ids = tokenizer.encode("ᚠᛇᚻ")  # runes are not in the training text
    assert all(tokenizer.piece(i).startswith("<0x") for i in ids)


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="corrupt tokenizer model"):
        Tokenizer(bad)
