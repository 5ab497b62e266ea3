"""The task registry: a task's package is downloaded once into the cache; an unknown name lists the choices."""

import hashlib
import io
import zipfile

import pytest

from palmkit.data.fetch import Package
from palmkit.data.tasks import load_task, package_dir
from palmkit.errors import PalmkitError
from tests.conftest import TASK_ROOT
from tests.data.conftest import local_index


def test_fetch_downloads_once_into_the_cache(tmp_path, monkeypatch):
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo/data/file.txt", "hello")
        z.writestr("demo/code.py", "import os")  # not a member: left out
    monkeypatch.setenv("PIP_INDEX_URL", local_index(tmp_path / "index", "demo", {"demo-1.0-py3-none-any.whl":
                                                                                 wheel.getvalue()}))
    monkeypatch.delenv("PALMKIT_TASK_DATA", raising=False)
    package = Package("demo", "1.0", "pip", ("demo/data/*",), "demo-1.0-py3-none-any.whl",
                      hashlib.sha256(wheel.getvalue()).hexdigest())
    path = package_dir(package, cache=tmp_path)
    assert (path / "demo/data/file.txt").read_text() == "hello" and not (path / "demo/code.py").exists()
    (tmp_path / "index" / "simple" / "demo" / "demo-1.0-py3-none-any.whl").unlink()  # the index is not asked again
    assert package_dir(package, cache=tmp_path) == path
    assert path.parent.parent == tmp_path / "tasks"  # beside, not inside, the pretraining corpus's packages


def test_unknown_task_names_the_choices():
    with pytest.raises(PalmkitError, match="sentiment-en"):
        load_task("nope", TASK_ROOT)
