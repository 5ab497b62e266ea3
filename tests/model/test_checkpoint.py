"""Checkpoint folders: exact round trips; missing, corrupt or mismatched files named; no unpickling; atomic saves."""

import json
import os

import pytest
import torch

from palmkit.errors import CheckpointError, PalmkitError
from palmkit.io import MANIFEST
from palmkit.model.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint
from tests.conftest import random_model


def test_round_trip_same_logits(tmp_path, tokenizer):
    model = random_model(tokenizer.vocab_size, seed=3)
    save_checkpoint(tmp_path / "c", model, tokenizer, extra={"step": 7})
    loaded, tok, config = load_checkpoint(tmp_path / "c")
    x = torch.randint(0, tokenizer.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert config["step"] == 7 and tok.vocab_size == tokenizer.vocab_size
    assert sorted(os.listdir(tmp_path / "c")) == [MANIFEST, "config.json", "model.safetensors", "tokenizer.model"]


def test_missing_folder_and_files(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing checkpoint file: .*model\.safetensors"):
        load_checkpoint(broken)


@pytest.mark.parametrize(("name", "content"), [
    ("model.safetensors", b"\x00" * 50),
    ("config.json", b"{not json"),
    ("tokenizer.model", b"garbage"),
])
def test_corrupt_files_name_the_file(tmp_path, checkpoint, name, content):
    bad = tmp_path / "bad"
    save_checkpoint(bad, *load_checkpoint(checkpoint)[:2])
    (bad / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(bad)


def test_truncated_weights_are_detected(tmp_path, checkpoint):
    bad = tmp_path / "trunc"
    save_checkpoint(bad, *load_checkpoint(checkpoint)[:2])
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt checkpoint file"):
        load_checkpoint(bad)


def test_mismatched_config_is_reported(tmp_path, checkpoint):
    bad = tmp_path / "mismatch"
    save_checkpoint(bad, *load_checkpoint(checkpoint)[:2])
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["d_model"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(bad)


def test_loading_never_unpickles(tmp_path, checkpoint):
    """A pickle planted as the weights file is refused, not executed."""
    bad = tmp_path / "pickle"
    save_checkpoint(bad, *load_checkpoint(checkpoint)[:2])
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, bad / "model.safetensors")
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    assert not marker.exists()


def test_failed_save_keeps_previous_checkpoint(tmp_path, checkpoint, monkeypatch):
    model, tok, _ = load_checkpoint(checkpoint)
    target = tmp_path / "keep"
    save_checkpoint(target, model, tok, extra={"step": 1})
    before = (target / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("palmkit.model.checkpoint.atomic_copy", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, random_model(tok.vocab_size, seed=9), tok, extra={"step": 2})
    assert (target / "model.safetensors").read_bytes() == before
    assert json.loads((target / "config.json").read_text())["step"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_never_replaces_a_folder_with_the_users_files(tmp_path, checkpoint):
    model, tok, _ = load_checkpoint(checkpoint)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.md").write_text("my notes")
    with pytest.raises(PalmkitError, match=r"not a palmkit folder .*notes\.md.*--force"):
        save_checkpoint(target, model, tok)
    assert [p.name for p in target.iterdir()] == ["notes.md"]
    save_checkpoint(target, model, tok, force=True)  # the checkpoint's files written in, the notes kept
    assert sorted(os.listdir(target)) == [MANIFEST, "config.json", "model.safetensors", "notes.md", "tokenizer.model"]
    assert (target / "notes.md").read_text() == "my notes" and load_checkpoint(target)[2]["model"]
    save_checkpoint(tmp_path / "ckpt", model, tok)
    save_checkpoint(tmp_path / "ckpt", model, tok, extra={"step": 2})  # palmkit's own folder: replaced
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["step"] == 2


def test_the_bos_rule_is_recorded_and_old_checkpoints_keep_theirs(tmp_path, tokenizer):
    from palmkit.model.tokenizer import Tokenizer

    model = random_model(tokenizer.vocab_size)
    save_checkpoint(tmp_path / "new", model, tokenizer)
    assert json.loads((tmp_path / "new" / CONFIG_FILE).read_text())["tokenizer"] == {"add_bos": True}
    assert load_checkpoint(tmp_path / "new")[1].add_bos
    save_checkpoint(tmp_path / "no-bos", model, Tokenizer(tokenizer.path, add_bos=False))
    tok = load_checkpoint(tmp_path / "no-bos")[1]
    assert not tok.add_bos and tok.encode_prompt("Hi") == tokenizer.encode("Hi")
    # written before the rule was recorded: palmkit prompted such checkpoints with BOS, and still does
    config = json.loads((tmp_path / "new" / CONFIG_FILE).read_text())
    del config["tokenizer"]
    (tmp_path / "new" / CONFIG_FILE).write_text(json.dumps(config))
    assert load_checkpoint(tmp_path / "new")[1].encode_prompt("Hi") == tokenizer.encode("Hi", bos=True)
