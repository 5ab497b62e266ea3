"""`palmkit finetune chat`: the result is a plain checkpoint that generates and exports."""

import pytest

from palmkit.finetune.chat import finetune_chat
from palmkit.finetune.fit import FinetuneConfig
from palmkit.finetune.heads import HEAD_FILE
from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams
from palmkit.model.chat_template import format_chat
from palmkit.model.checkpoint import load_checkpoint
from palmkit.model.export import export_hf
from tests.conftest import TASK_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def test_chat_result_is_a_plain_checkpoint(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))
    out = tmp_path / "chat"
    best = finetune_chat(str(checkpoint), str(out), task="dialogue-en",
                         train=FinetuneConfig(epochs=1, batch_size=4, max_len=64))
    assert best["valid/loss"] > 0
    assert not (out / HEAD_FILE).exists()
    model, tok, config = load_checkpoint(out)
    assert config["task"] == "chat"
    assert (export_hf(out, tmp_path / "hf") / "config.json").is_file()
    text = generate(model, tok, [format_chat([{"role": "user", "content": "Hi"}])],
                    SamplingParams(max_new_tokens=4, temperature=0))[0]
    assert text.finish_reason in ("stop", "length")
