"""`palmkit finetune ner`: a character-level tagger on the People's Daily slice, and `palmkit tag`."""

import pytest

from palmkit.cli import main
from palmkit.data.tasks import TaskFiles
from palmkit.errors import PalmkitError
from palmkit.finetune.fit import FinetuneConfig
from palmkit.finetune.ner import finetune_ner
from palmkit.finetune.predict import load_tagger
from palmkit.model.checkpoint import load_config
from tests.conftest import TASK_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def test_ner_tagger_and_cli(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))
    out = tmp_path / "ner"
    best = finetune_ner(str(checkpoint), str(out), data=TaskFiles(task="ner-zh"),
                        train=FinetuneConfig(epochs=1, batch_size=8, max_len=48, lora_rank=4,
                                             lora_targets=["q_proj,v_proj", "up_proj"]))
    assert {"valid/f1", "valid/precision", "valid/recall"} <= set(best)
    config = load_config(out)
    assert config["task"] == "ner" and config["char_level"] and "B-PER" in config["labels"]
    assert config["finetune"]["lora_targets"] == ["q_proj", "v_proj", "up_proj"]
    tagger = load_tagger(out)
    text = "国家主席江泽民在北京发表讲话"
    (ents,) = tagger.tag([text])
    assert all(e["text"] == text[e["start"]:e["end"]] and e["type"] in ("PER", "LOC", "ORG") for e in ents)
    assert tagger.tag(["", "   "]) == [[], []]
    assert main(["tag", "--checkpoint", str(out), "我爱北京", "江泽民"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    with pytest.raises(PalmkitError, match="0 validation examples"):  # ner-en's slice has no valid sentence
        finetune_ner(str(checkpoint), str(tmp_path / "en"), data=TaskFiles(task="ner-en"),
                     train=FinetuneConfig(epochs=1))
