"""Unicode ranges of the scripts written without spaces between words, for regular-expression classes.

Chinese, Japanese and Korean text cannot be cut into words at spaces: cleaning measures a line's script by
these ranges, and retrieval and baselines take one character at a time where they match.
"""

from __future__ import annotations

# CJK unified ideographs, extension A and compatibility ideographs
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"

# hiragana, katakana, katakana phonetic extensions, half-width katakana
KANA = "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"

# precomposed Hangul syllables
HANGUL = "\uac00-\ud7af"

CJK = HAN + KANA + HANGUL
