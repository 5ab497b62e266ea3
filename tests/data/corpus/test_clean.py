"""The language filter: German kept, English and code dropped; the rules per language."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from palmkit.data.corpus.clean import clean_text, keep_line
from palmkit.data.corpus.readers import help_text
from tests.data.corpus.conftest import HELP_DE, HELP_EN


def _lines(html: Path, lang: str) -> list[tuple[str, str]]:
    return [(x, lang) for x in clean_text(help_text(html.read_text())).split("\n") if x]


def test_language_filter_keeps_german_and_drops_english_and_code():
    mixed = []
    for page in ("shared/01/02050000.html", "sbasic/shared/thisdbdoc.html"):
        mixed += _lines(HELP_DE / page, "de") + _lines(HELP_EN / page, "en")
        for block in re.findall(r"<pre[^>]*>(.*?)</pre>", (HELP_DE / page).read_text(), re.S):
            mixed += [(x, "code") for x in clean_text(html.unescape(re.sub("<[^>]+>", "", block))).split("\n")]
    mixed = [(x, k) for x, k in mixed if x.strip()]
    kept = [(x, k) for x, k in mixed if keep_line(x, "de")]
    german = [x for x, k in mixed if k == "de"]
    assert len(german) >= 15 and all(keep_line(x, "de") for x in german)  # recall 1.0
    assert not [x for x, k in kept if k == "code" and len(x) > 24]  # every code statement goes
    # Precision: what is kept and not German are headings and identifiers of at most three words ("Copy",
    # "Choose Edit - Copy.", "End Sub"), which no line-level rule can tell apart; every sentence is German.
    assert all(len(re.findall(r"[^\W\d_]+", x)) <= 3 for x, k in kept if k != "de")
    assert sum(k == "de" for _, k in kept) / len(kept) >= 0.65


@pytest.mark.parametrize(("line", "lang", "keep"), [
    ("Эта программа выводит список файлов.", "ru", True), ("This program lists files.", "ru", False),
    ("このコマンドはファイルを表示します。", "ja", True), ("Returns the value of the cell.", "ja", False),
    ("显示帮助信息并退出", "zh", True), ("Show help and exit", "zh", False), ("このコマンドは", "zh", False),
    ("Sélectionnez le fichier dans la liste.", "fr", True), ("Seleccione el archivo de la lista.", "es", True),
    ("Select the file in the list and click OK.", "fr", False), ("#include <stdio.h>", "de", False),
    ("=SUMME(A1:A10)", "de", False), ("for (i = 0; i < n; i++) {", "en", False),
    ("And returns to the places that people have forgotten;", "en", True),
    ("Siehe systemd.syntax(7) für eine allgemeine Beschreibung.", "de", True),
])
def test_language_filter_rules(line, lang, keep):
    assert keep_line(line, lang) is keep
