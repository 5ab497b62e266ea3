"""Examples: the words of raw text, split as the CoNLL data splits them."""

from palmkit.data.tasks import words_of


def test_words_of_raw_text():
    assert words_of("Hi @bob, see #NYC!", False) == [("Hi", 0), ("@bob", 3), (",", 7), ("see", 9), ("#NYC", 13),
                                                     ("!", 17)]
    assert [w for w, _ in words_of("It's great", False)] == ["It", "'s", "great"]  # as the CoNLL data splits it
    assert words_of("江 泽民", True) == [("江", 0), ("泽", 2), ("民", 3)]
