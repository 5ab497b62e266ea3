"""Healing a compressed model: the loss falls, and `palmkit compress --heal_steps` records it."""

import copy
import json

import pytest
import torch

from palmkit.cli import main
from palmkit.model.checkpoint import load_checkpoint, save_checkpoint
from palmkit.model.low_rank import low_rank
from palmkit.train.heal import heal
from tests.conftest import random_model


@pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread
def test_healing_lowers_the_loss_and_is_recorded(tmp_path, corpus, capsys):
    from palmkit.model.tokenizer import Tokenizer

    tok = Tokenizer(corpus / "tokenizer.model")
    model = random_model(tok.vocab_size, seed=3)
    low_rank(model, rank_ratio=0.25, targets=["mlp"])
    before = copy.deepcopy(model.state_dict())
    losses = heal(model, corpus, steps=10, lr=1e-2, seq_len=32, batch=4)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    assert not torch.equal(before["layers.0.mlp.up_proj.a.weight"], model.layers[0].mlp.up_proj.a.weight)
    assert not model.training
    bar = capsys.readouterr().err  # the progress bar counts training tokens: 10 steps of 4 x 32
    assert "heal" in bar and "1.28k/1.28k" in bar and "tok/s" in bar
    save_checkpoint(tmp_path / "fp32", random_model(tok.vocab_size, seed=3), tok)
    args = ["compress", "--checkpoint", str(tmp_path / "fp32"), "--rank_ratio", "0.25", "--seq_len", "32",
            "--batch", "4", "--targets", "mlp"]
    assert main([*args, "--out", str(tmp_path / "healed"), "--heal_steps", "2", "--data", str(corpus)]) == 0
    config = json.loads((tmp_path / "healed" / "config.json").read_text())
    assert config["low_rank"]["heal_steps"] == 2 and config["low_rank"]["rank_ratio"] == 0.25
    assert load_checkpoint(tmp_path / "healed")[0].layers[0].mlp.gate_proj.a.out_features == 32
    assert main([*args, "--out", str(tmp_path / "x"), "--heal_steps", "2"]) == 2  # no corpus
    assert main(["compress", "--checkpoint", str(tmp_path / "healed"), "--out", str(tmp_path / "x"),
                 "--rank_ratio", "0.5"]) == 2  # already factorised
