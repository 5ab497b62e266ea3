"""What the data tests share: the corpus packages' fixture slices, and downloads made to fail (no network)."""

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
