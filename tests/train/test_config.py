"""Pretraining options: a saved train_config.json with old spellings still reads."""

import json


def test_old_dtype_spelling_still_reads(tmp_path):
    from palmkit.train.config import TrainConfig, saved_config

    (tmp_path / "train_config.json").write_text(json.dumps({"train": {"dtype": "bf16", "preset": "tiny", "gone": 1}}))
    assert saved_config(tmp_path) == TrainConfig(preset="tiny", dtype="bfloat16")
    assert TrainConfig(dtype="fp32").dtype == "float32"
