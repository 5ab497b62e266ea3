"""Cleaning extracted text: control codes and spacing, and a line filter that keeps the source's language.

Two policies: the built-in sources (rendered man pages, help HTML) are tidied by `clean_text`; the user's own text
is kept as given by `keep_as_given`, which takes out only what cannot be text (control codes, NUL, halves of
UTF-16 pairs), so that code, Markdown and poetry keep their layout through the corpus and the tokenizer.
"""

from __future__ import annotations

import re
from collections import Counter

from palmkit.data.scripts import HAN, KANA

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


_OVERSTRIKE = re.compile(r"[^\n]\x08")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")


_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Drop terminal colour codes, overstrikes and control characters; tidy spaces and blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x0c", "\n")
    text = _ANSI.sub("", text)
    while "\x08" in text:
        new = _OVERSTRIKE.sub("", text)  # "B\bB" (bold) and "_\bx" (underline) both leave the last char
        if new == text:
            break
        text = new
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


_NOT_TEXT = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|[\x00-\x08\x0b\x0e-\x1f\x7f]")  # keeps \t \n \f \r


_SURROGATE = re.compile("[\ud800-\udfff]")  # from JSON escapes: not encodable as UTF-8


def keep_as_given(text: str, stats: Counter) -> str:
    """The user's text as given, less terminal escape sequences, control characters (tab, newline, carriage
    return and form feed are kept) and NUL, each counted in `stats`; a lone UTF-16 surrogate (which UTF-8 cannot
    hold) becomes U+FFFD and is counted as invalid UTF-8."""
    text, n = _NOT_TEXT.subn("", text)
    stats["control_chars"] += n
    text, n = _SURROGATE.subn("\ufffd", text)
    stats["invalid_utf8"] += n
    return text


def _runs(pattern: str) -> re.Pattern:
    return re.compile(f"[{pattern}]+")


_LETTER = re.compile(r"[^\W\d_]+")


_LATIN = _runs("A-Za-z\u00c0-\u024f\u1e00-\u1eff")


_CYRILLIC = _runs("\u0400-\u04ff")


_HAN = _runs(HAN)


_KANA = _runs(KANA)


_ASCII_NOISE = _runs(r"0-9!-/:-@\[-`{-~\u2500-\u259f")  # ASCII digits and symbols, box drawing


_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")


_CODE = re.compile(r"[{}]\s*$|^\s*}|\)\s*;\s*$"  # braces, statements ending in ");"
                   r"|\w\.\w+\((?!\d\w*\))|^\s*[\w.\[\]]+\s*=\s*\S"  # method calls (not man(1) references), assignments
                   r"|^\s*(\#\s*include|\#!|[$#>%]\s|import\s|from\s+\S+\s+import|def\s|class\s\w+\s*[:({]"
                   r"|function\s*\(|(?:var|let|const)\s+\w+\s*=|</?\w+[^>]*>|\w+\s*:=|\w+\s*==)")


# The most frequent function words of each language (hand-picked so that few are shared).
STOPWORDS = {lang: frozenset(words.split()) for lang, words in {
    "en": "the of and to is that for it as with was on be by are this or from at not but have which you can "
          "if will they their has its been were would when there what your should all more",
    "de": "der die und den von zu das mit sich des auf für ist im dem nicht ein eine als auch es werden aus "
          "er dass sie nach wird bei einer um sind noch wie einem über einen zum haben nur oder "
          "aber vor zur bis durch können kann wenn diese dieser wählen sie",
    "fr": "de la le et les des un du une que est pour qui dans par plus pas au sur ne se ce il sont avec son ou "
          "mais vous cette peut être aux leur nous elle cliquez sélectionnez fichier",
    "es": "de la que se el en y los del las por un para con no una su al es lo como más pero sus le ha sin "
          "sobre este ya entre cuando todo esta ser son dos también puede haga seleccione archivo",
    "it": "di e il la che per un del non è una le si da con i dei al sono come più ma anche nel della alla "
          "questo ha gli lo se delle",
}.items()}


def _count(pattern: re.Pattern, text: str) -> int:
    return sum(map(len, pattern.findall(text)))


def keep_line(line: str, lang: str) -> bool:
    """True when a line reads as prose in `lang`: not code or symbols, in the language's script and, for
    Latin-script languages, with more of its stopwords than of another language's (untranslated English)."""
    text = line.strip()
    if not text:
        return True
    letters = _count(_LETTER, text)
    if letters < 2 or letters < 1.5 * _count(_ASCII_NOISE, text) or _CODE.search(text):
        return False
    if lang == "zh":
        han, kana = _count(_HAN, text), _count(_KANA, text)
        return han >= 0.3 * letters and kana <= 0.2 * (han + kana)
    if lang == "ja":
        return _count(_HAN, text) + _count(_KANA, text) >= 0.3 * letters
    if lang == "ru":
        return _count(_CYRILLIC, text) >= 0.5 * letters
    if lang not in STOPWORDS:
        return True  # a language we have no rule for: keep what passed the code test
    if _count(_LATIN, text) < 0.9 * letters:
        return False
    words = [w.lower() for w in _WORD.findall(text)]
    scores = {k: sum(w in stop for w in words) for k, stop in STOPWORDS.items()}
    mine, best_other = scores[lang], max(v for k, v in scores.items() if k != lang)
    if best_other >= 2 and best_other > mine:
        return False
    # Untranslated English is what pollutes other languages' sources: a sentence with an English function word
    # must also show one of its own language.
    return lang == "en" or len(words) < 4 or mine >= 1 or scores["en"] == 0


def filter_lines(text: str, lang: str, stats: Counter | None = None) -> str:
    """The lines of `text` that `keep_line` accepts for `lang` (blank lines kept as paragraph breaks)."""
    kept = []
    for line in text.split("\n"):
        ok = keep_line(line, lang)
        if stats is not None and line.strip():
            stats["lines_kept" if ok else "lines_dropped"] += 1
        if ok:
            kept.append(line)
    return _BLANKS.sub("\n\n", "\n".join(kept)).strip()
