"""Pretraining options: a saved train_config.json with old spellings, or without newer options, still reads."""

import json


def test_old_dtype_spelling_still_reads(tmp_path):
    from palmkit.train.config import TrainConfig, saved_config

    (tmp_path / "train_config.json").write_text(json.dumps({"train": {"dtype": "bf16", "preset": "tiny", "gone": 1}}))
    # an option newer than the file takes the value that does what the run did then
    assert saved_config(tmp_path) == TrainConfig(preset="tiny", dtype="bfloat16", embed_lr_ratio=1.0)
    assert TrainConfig(dtype="fp32").dtype == "float32"


def test_a_run_saved_before_an_option_existed_resumes_as_it_was_trained(corpus, tmp_path):
    """A train_config.json without embed_lr_ratio (older palmkit) resumes with one AdamW lr for all weights, the
    optimiser it was saved with, not with today's default: the resumed run ends where the uninterrupted one does."""
    import shutil

    from palmkit.cli import main
    from palmkit.train.config import ADDED_LATER, TrainConfig
    from palmkit.train.pretrain import pretrain
    from tests.train.conftest import BASE, assert_same_weights, weights

    assert TrainConfig().embed_lr_ratio != ADDED_LATER["embed_lr_ratio"]  # else this test shows nothing
    opts = {**BASE, "max_steps": 4, "save_every": 2, "eval_every": 0, "embed_lr_ratio": 1.0}
    whole = tmp_path / "whole"
    pretrain(str(corpus), str(whole), TrainConfig(**opts))
    old = tmp_path / "old"
    shutil.copytree(whole / "checkpoints" / "step-0000002", old / "checkpoints" / "step-0000002")
    saved = json.loads((whole / "train_config.json").read_text())
    del saved["train"]["embed_lr_ratio"]
    (old / "train_config.json").write_text(json.dumps(saved))
    assert main(["pretrain", "--data", str(corpus), "--out", str(old), "--resume"]) == 0
    assert_same_weights(weights(old), weights(whole))
    assert json.loads((old / "train_config.json").read_text())["train"]["embed_lr_ratio"] == 1.0
