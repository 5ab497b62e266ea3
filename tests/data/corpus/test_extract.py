"""Extraction: a source's files are found inside its package folder only."""

from palmkit.data.corpus.extract import source_files
from palmkit.data.corpus.sources import SOURCES


def test_source_files_stay_inside_the_package_folder(tmp_path):
    """An extracted package may hold links: to a folder or a file elsewhere on the machine. They are not read."""
    source = next(s for s in SOURCES if s.name == "help-de")  # pattern usr/share/libreoffice/help/de/text/**/*.html
    root = tmp_path / "pkg"
    text = root / "usr/share/libreoffice/help/de/text"
    (text / "shared").mkdir(parents=True)
    (text / "shared" / "main.html").write_text("<p>Hallo</p>")
    outside = tmp_path / "elsewhere"
    (outside / "private").mkdir(parents=True)
    (outside / "private" / "secret.html").write_text("<p>not the package's</p>")
    (text / "linked").symlink_to(outside / "private")  # a folder link out of the package
    (text / "shared" / "link.html").symlink_to(outside / "private" / "secret.html")  # a file link out of it
    (root / "usr/share/libreoffice/help/de").rename(root / "usr/share/libreoffice/help/real-de")
    (root / "usr/share/libreoffice/help/de").symlink_to(outside)  # the source's own folder is a link out
    (outside / "text").mkdir()
    (outside / "text" / "x.html").write_text("<p>outside</p>")
    assert source_files(source, root) == []
    (root / "usr/share/libreoffice/help/de").unlink()
    (root / "usr/share/libreoffice/help/real-de").rename(root / "usr/share/libreoffice/help/de")
    assert source_files(source, root) == [str(text / "shared" / "main.html")]
