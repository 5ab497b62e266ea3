"""What the corpus tests share: help-page fixture folders, a corpus cache laid out from the fixtures, one build."""

import shutil
from pathlib import Path

import pytest

from palmkit.data.corpus.build import build
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
    summary = build(str(tmp / "out"), langs=["en,de", "zh"], cache=str(cache), vocab_size=1000, workers=1)
    return tmp / "out", summary
