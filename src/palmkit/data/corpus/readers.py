"""Readers that turn each source's files into plain-text documents: roff man pages, help HTML, fortunes,
People's Daily, chats, BBC articles, wikitext (the user's own files: `palmkit.data.corpus.inputs`).
"""

from __future__ import annotations

import bz2
import gzip
import html
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from palmkit.data.corpus.clean import clean_text
from palmkit.io import decode_text

# Plain UTF-8 without overstrike or colour (-P-cbou), tables (-t), no hyphenation (HY=0), one continuous page
# (cR=1), and lines 2000 columns wide so that each paragraph comes out as one line instead of wrapped at 80.
GROFF = ["groff", "-t", "-Tutf8", "-mandoc", "-Kutf8", "-P-cbou", "-rLL=2000n", "-rHY=0", "-rcR=1"]


PAGE_BREAK = "PALMKITPAGEBREAK"


# Chinese translators broke lines inside sentences; groff joins them with a space that Chinese never has.
_CJK_GAP = re.compile(r"(?<=[\u3000-\u30ff\u4e00-\u9fff\uff00-\uffef]) (?=[\u3040-\u30ff\u4e00-\u9fff])")


# Sections that po4a and the Chinese project append to every translated page (translator credits, licence):
# the same boilerplate hundreds of times would be memorised, not learnt from.
MAN_TAIL_HEADINGS = frozenset({"ÜBERSETZUNG", "TRADUCTION", "TRADUCCIÓN", "ПЕРЕВОД", "TRADUZIONE", "COLOPHON",
                               "跋", "[中国Linux论坛man手册页翻译计划]", "[中文版维护人]"})


def _man_body(lines: list[str]) -> str:
    """Rendered lines without the page header and footer, the translator sections, and groff's Unicode hyphen
    and minus (which would turn option names such as --help into different characters than users type)."""
    # At a line length of 2000 the three parts of a header or footer are hundreds of spaces apart.
    lines = [x.strip() for x in lines if " " * 40 not in x]
    for i, x in enumerate(lines):
        if x in MAN_TAIL_HEADINGS:
            lines = lines[:i]
            break
    text = "\n".join(lines).replace("\u2010", "-").replace("\u2212", "-")
    return _CJK_GAP.sub("", text)


def _groff(source: str, timeout: float) -> list[str] | None:
    try:
        result = subprocess.run(GROFF, input=source.encode("utf-8"), capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return None if result.returncode else result.stdout.decode("utf-8", errors="replace").split("\n")


def render_man(source: str) -> str:
    """Plain text of one roff man page (a paragraph per line): groff when installed, else `strip_roff`."""
    lines = _groff(source, 60) if shutil.which("groff") else None
    return strip_roff(source) if lines is None else _man_body(lines)


def render_man_pages(sources: list[str]) -> list[str]:
    """`render_man` of many pages, with one groff run for all man(7) pages: starting groff costs several times
    more than rendering a page (benchmarks/README.md, "groff start-up"). A marker paragraph between pages splits
    the output; if any page is lost (a page that swallows the marker), each page is rendered on its own instead."""
    batch = [s for s in sources if not re.search(r"(?m)^\.Dd\b", s)]  # mdoc pages need their own run
    if len(batch) < 2 or not shutil.which("groff"):
        return [render_man(s) for s in sources]
    lines = _groff("".join(f"{s}\n.fi\n.PP\n{PAGE_BREAK}\n" for s in batch), 60 + 5 * len(batch))
    pages: list[list[str]] = [[]]
    for line in lines or ():
        if line.strip() == PAGE_BREAK:
            pages.append([])
        else:
            pages[-1].append(line)
    if len(pages) != len(batch) + 1:  # the last part holds only the footer
        return [render_man(s) for s in sources]
    rendered = dict(zip(batch, map(_man_body, pages), strict=False))
    return [rendered[s] if s in rendered else render_man(s) for s in sources]


_ROFF_GLYPHS = {"em": "—", "en": "–", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
                "bu": "•", "co": "©", "rg": "®", "tm": "™", "hy": "-", "mi": "-", "ti": "~", "ha": "^",
                "rs": "\\", "lh": "☜", "rh": "☞", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "de": "°"}


_ROFF_ESCAPE = re.compile(r"\\(\(..|\[[^\]]*\]|\*(?:\(..|\[[^\]]*\]|.)|f(?:\(..|\[[^\]]*\]|.)|[sn][+-]?(?:\(..|"
                          r"\[[^\]]*\]|\d+)|.)")


_ROFF_FONT_MACROS = {"B", "I", "BR", "RB", "BI", "IB", "IR", "RI", "SM", "SB", "SH", "SS"}


_ROFF_BREAKS = {"PP", "LP", "P", "TP", "IP", "HP", "sp", "br", "SH", "SS", "RS", "RE", "TH", "nf", "fi", "EX", "EE"}


def _roff_escape(m: re.Match) -> str:
    code = m.group(1)
    if code[0] in "(":
        return _ROFF_GLYPHS.get(code[1:], "")
    if code[0] == "[":
        name = code[1:-1]
        return chr(int(name[1:], 16)) if re.fullmatch(r"u[0-9A-F]{4,6}", name) else _ROFF_GLYPHS.get(name, "")
    if code[0] == "*":
        name = code[1:].strip("([]")
        return _ROFF_GLYPHS.get(name, "")
    return {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "'", "`": "`"}.get(code, "") \
        if code[0] not in "fsn" else ""


def strip_roff(source: str) -> str:
    """Plain text of a man page without groff: requests dropped, font macros and escapes resolved, filled lines
    joined into paragraphs (used where groff is missing)."""
    paragraphs: list[list[str]] = [[]]
    fill = True
    for raw in source.split("\n"):
        if raw.startswith((".\\\"", "'\\\"", '.\\"')):
            continue
        if raw.startswith((".", "'")):
            parts = raw[1:].split(None, 1)
            name, args = (parts[0], parts[1] if len(parts) > 1 else "") if parts else ("", "")
            fill = {"nf": False, "EX": False, "fi": True, "EE": True}.get(name, fill)
            if name in _ROFF_BREAKS:
                paragraphs.append([])
            if name in _ROFF_FONT_MACROS or name == "IP":
                words = re.findall(r'"([^"]*)"|(\S+)', args)
                args = [a or b for a, b in words][:1] if name == "IP" else [a or b for a, b in words]
                joiner = " " if name in {"B", "I", "SM", "SB", "SH", "SS", "IP"} else ""
                text = joiner.join(args)
                if text:
                    paragraphs[-1].append(_ROFF_ESCAPE.sub(_roff_escape, text))
                if name in {"SH", "SS"}:
                    paragraphs.append([])
            continue
        line = _ROFF_ESCAPE.sub(_roff_escape, raw)
        if not fill:
            paragraphs.append([line])
            paragraphs.append([])
        elif line.strip():
            paragraphs[-1].append(line.strip())
        else:
            paragraphs.append([])
    return "\n\n".join(" ".join(p) for p in paragraphs if p and " ".join(p).strip())


def read_man_pages(paths: list[Path], stats: Counter) -> Iterator[str]:
    """Gzipped (or plain) roff man pages, rendered; `.so` redirections are skipped (they repeat another page)."""
    sources = []
    for path in paths:
        raw = path.read_bytes()
        source = decode_text(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw, "latin-1")
        if re.match(r"\s*\.so\s", source) and len(source) < 200:
            stats["redirections"] += 1
        else:
            sources.append(source)
    yield from render_man_pages(sources)


_TAG = re.compile(r"<!--.*?-->|<(/?)([a-zA-Z][a-zA-Z0-9]*)([^>]*)>", re.S)


_BLOCK_TAGS = frozenset("p div h1 h2 h3 h4 h5 h6 li tr td th table ul ol dl dt dd section br pre".split())


_VOID_TAGS = frozenset("br img meta input hr link wbr source area col".split())


_SKIP_TAGS = frozenset("script style pre code noscript head".split())


# Mac-only variants of shortcuts (shown instead of the default by the help's script), code samples, the
# related-topics link list, debug footers.
_SKIP_CLASS = re.compile(r'class="[^"]*\b(MAC|bascode|pycode|code|relatedtopics|debug)\b')


def help_text(page: str) -> str:
    """The text inside `<div id="DisplayArea">` of a LibreOffice help page, a line per block element."""
    start = page.find('id="DisplayArea"')
    if start < 0:
        return ""
    pos = page.find(">", start) + 1
    out: list[str] = []
    stack: list[tuple[str, bool]] = []
    skip = 0
    for m in _TAG.finditer(page, pos):
        if not skip:
            out.append(page[pos:m.start()])
        pos = m.end()
        close, name, attrs = m.group(1), (m.group(2) or "").lower(), m.group(3) or ""
        if not name:
            continue
        if name in _VOID_TAGS:
            if name == "br" and not skip:
                out.append("\n")
            continue
        if not close:
            skipping = name in _SKIP_TAGS or bool(_SKIP_CLASS.search(attrs))
            stack.append((name, skipping))
            skip += skipping
        elif name == "div" and not any(n == "div" for n, _ in stack):
            break  # the DisplayArea div itself closes
        else:
            while stack:
                opened, skipping = stack.pop()
                skip -= skipping
                if opened == name:
                    break
        if name in _BLOCK_TAGS and not skip:
            out.append("\n")
    return "\n".join(x for x in html.unescape("".join(out)).split("\n") if x.strip())


def read_help(path: Path, stats: Counter) -> Iterator[str]:
    """A LibreOffice help page."""
    yield help_text(path.read_text(encoding="utf-8", errors="replace"))


def read_fortunes(path: Path, stats: Counter) -> Iterator[str]:
    """A fortune file: records separated by lines holding only `%` (index `.dat` files are not read)."""
    if path.suffix == ".dat" or "off" in path.parts:  # offensive fortunes stay out of a default corpus
        return
    text = clean_text(decode_text(path.read_bytes(), "latin-1"))
    yield from re.split(r"(?m)^%%?$", text)


_PD_TAG = re.compile(r"/[A-Za-z]+(?=\s|$)")


_PD_END = re.compile(r"([。！？!?”」』…：:](（[^（）]*）)?|^（.*）)$")


def read_peoples_daily(path: Path, stats: Counter) -> Iterator[str]:
    """People's Daily 1998, `word/TAG` tokens: tags dropped, words joined; an article starts at a headline
    (a line without final punctuation) that follows a finished paragraph."""
    article: list[str] = []
    ended = True
    for line in decode_text(path.read_bytes(), "latin-1").splitlines():
        text = "".join(_PD_TAG.sub("", line).split())
        if not text:
            continue
        is_end = bool(_PD_END.search(text))
        if ended and not is_end and article:
            yield "\n".join(article)
            article = []
        article.append(text)
        ended = is_end
    if article:
        yield "\n".join(article)


def read_chitchat(path: Path, stats: Counter) -> Iterator[str]:
    """chitchat_dataset.json: one document per conversation, a line per message, a blank line between turns."""
    for chat in json.loads(path.read_bytes()).values():
        turns = ["\n".join(m["text"].strip() for m in turn if m.get("text", "").strip())
                 for turn in chat.get("messages", [])]
        yield "\n\n".join(t for t in turns if t)


def read_bbc(path: Path, stats: Counter) -> Iterator[str]:
    """A BBC News article (Latin-1): a headline line, then paragraphs."""
    yield decode_text(path.read_bytes(), "latin-1")


_WIKI_DROP = [re.compile(p, re.S | re.I) for p in (
    r"<!--.*?-->", r"<ref[^>/]*/>", r"<ref[^>]*>.*?</ref>",
    r"<(math|gallery|timeline|score|syntaxhighlight|source|code|pre|imagemap)[^>]*>.*?</\1>")]


_WIKI_NESTED = [re.compile(r"\{\{[^{}]*\}\}"), re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)]


_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


_WIKI_NON_TEXT = re.compile(r"^\s*(file|image|category|media|wikipedia|wp|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


_WIKI_TAIL = re.compile(r"(?m)^==+\s*(references|external links|see also|further reading|notes|bibliography|"
                        r"sources|footnotes)\s*==+\s*$", re.I)


def _wiki_link(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    if _WIKI_NON_TEXT.match(target):
        return ""
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def strip_wikitext(text: str) -> str:
    """Readable text of a wikitext article: templates, tables, references, files and categories removed,
    links replaced by their labels, headings kept as lines, reference sections at the end dropped."""
    tail = _WIKI_TAIL.search(text)
    if tail:
        text = text[:tail.start()]
    for pattern in _WIKI_DROP:
        text = pattern.sub("", text)
    for pattern in (*_WIKI_NESTED, _WIKI_LINK):
        while True:  # innermost first, so nested templates, tables and links in captions all go
            text, n = pattern.subn(_wiki_link if pattern is _WIKI_LINK else "", text)
            if not n:
                break
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,5}", "", text)
    text = re.sub(r"(?m)^(=+)\s*(.*?)\s*\1\s*$", r"\2", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text)
    text = re.sub(r"(?m)^[*#:;]+\s*", "", text)
    text = re.sub(r"__[A-Z]+__|\s*\(\s*[,;]?\s*\)", "", text)  # magic words, parentheses left empty
    lines = [x for x in text.split("\n") if not re.fullmatch(r"[\W_]*", x) or not x.strip()]
    return "\n".join(lines)


def read_wiki(path: Path, stats: Counter) -> Iterator[str]:
    """A MediaWiki XML dump (.bz2 or plain): one document per article (namespace 0, no redirects)."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
            ns = fields.get("ns")
            if "redirect" not in fields and (ns is None or ns.text == "0") and fields.get("text") is not None:
                title = fields["title"].text if "title" in fields else ""
                yield f"{title}\n\n{strip_wikitext(fields['text'].text or '')}"
            elem.clear()


READERS: dict[str, Callable[..., Iterator[str]]] = {
    "help": read_help, "fortunes": read_fortunes, "peoples_daily": read_peoples_daily,
    "chitchat": read_chitchat, "bbc": read_bbc, "wiki": read_wiki,
}

