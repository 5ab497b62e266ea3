"""The base model the application recipes start from."""

import pytest

from palmkit.apps.recipes import QUICKSTART_MODEL, base_checkpoint
from palmkit.errors import PalmkitError


def test_an_explicit_checkpoint_must_be_a_checkpoint(tmp_path, checkpoint):
    assert base_checkpoint(str(checkpoint)) == checkpoint
    with pytest.raises(PalmkitError, match="not a palmkit checkpoint folder"):
        base_checkpoint(str(tmp_path))


def test_quickstart_model_first_then_one_pretrained_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_quickstart(out, minutes, langs, vocab_size):
        calls.append((out, minutes, langs))
        final = tmp_path / out / "model" / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")

    monkeypatch.setattr("palmkit.apps.recipes.quickstart", fake_quickstart)
    first = base_checkpoint(cache="base", minutes=2)
    assert first.resolve() == tmp_path / "base" / "model" / "final"
    assert base_checkpoint(cache="base", minutes=2) == first  # reused, not trained again
    assert calls == [("base", 2, ["en"])]
    (tmp_path / QUICKSTART_MODEL).mkdir(parents=True)
    (tmp_path / QUICKSTART_MODEL / "config.json").write_text("{}")
    assert base_checkpoint(cache="base") == QUICKSTART_MODEL
