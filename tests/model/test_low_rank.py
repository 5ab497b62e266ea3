"""Low-rank (SVD) factorisation: exact at full rank, Eckart-Young when truncated, `palmkit compress` round trips."""

import copy

import pytest
import torch

from palmkit.cli import main
from palmkit.infer.generate import generate
from palmkit.io import load_tensors
from palmkit.model.checkpoint import load_checkpoint, save_checkpoint
from palmkit.model.layouts import dense_weights
from palmkit.model.low_rank import LowRankLinear, factorize, low_rank
from tests.conftest import random_model
from tests.model.conftest import GREEDY, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def test_full_rank_svd_reproduces_the_model(model, tokens):
    full = copy.deepcopy(model)
    ranks = low_rank(full, rank_ratio=1.0, only_if_smaller=False)
    assert len(ranks) == 7 * model.config.n_layers  # q k v o gate up down, never the embedding
    with torch.no_grad():
        torch.testing.assert_close(full(tokens), model(tokens), rtol=0, atol=1e-4)


def test_truncated_svd_meets_eckart_young_and_rank_rules(model):
    linear = model.layers[0].mlp.up_proj
    s = torch.linalg.svdvals(linear.weight.double())
    layer = factorize(linear, 40)
    err = (layer.b.weight @ layer.a.weight - linear.weight).double().norm()
    torch.testing.assert_close(err, s[40:].square().sum().sqrt(), rtol=1e-4, atol=0)
    ranks = low_rank(copy.deepcopy(model), energy=0.9)
    for name, r in ranks.items():
        sv = torch.linalg.svdvals(model.get_submodule(name).weight.double()).square()
        assert sv[:r].sum() / sv.sum() >= 0.9 > sv[: r - 1].sum() / sv.sum()
    # q and o are square: at half rank their factors would be no smaller, so they stay whole.
    ranks = low_rank(copy.deepcopy(model), rank_ratio=0.5)
    assert not any("q_proj" in n or "o_proj" in n for n in ranks) and any("up_proj" in n for n in ranks)
    with pytest.raises(ValueError, match="exactly one"):
        low_rank(copy.deepcopy(model), rank_ratio=0.5, energy=0.9)


def test_svd_of_low_rank_weights_is_close_and_round_trips(tmp_path, tokenizer, tokens):
    model = random_model(tokenizer.vocab_size, seed=2)
    tokens = tokens % tokenizer.vocab_size
    with torch.no_grad():  # weights of rank <= 16 plus a little noise: what a rank-16 SVD should keep
        for name in ("layers.0.mlp.gate_proj", "layers.1.mlp.down_proj", "layers.1.self_attn.q_proj"):
            w = model.get_submodule(name).weight
            u, v = torch.randn(w.shape[0], 16), torch.randn(16, w.shape[1])
            w.copy_(u @ v * w.std() / 4 + 1e-4 * torch.randn_like(w))
    save_checkpoint(tmp_path / "fp32", model, tokenizer)
    assert main(["compress", "--checkpoint", str(tmp_path / "fp32"), "--out", str(tmp_path / "svd"),
                 "--rank_ratio", "0.125", "--targets", "mlp"]) == 0
    svd, _, config = load_checkpoint(tmp_path / "svd")
    ranks = config["low_rank"]["ranks"]
    assert ranks["layers.0.mlp.gate_proj"] == 16 and not any("self_attn" in n for n in ranks)
    assert isinstance(svd.get_submodule("layers.1.mlp.down_proj"), LowRankLinear)
    assert svd.num_params() < model.num_params()
    dense = copy.deepcopy(model)
    dense.load_state_dict(dense_weights(load_tensors(tmp_path / "svd" / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(svd(tokens), dense(tokens), rtol=0, atol=1e-4)
        for name in ("layers.0.mlp.gate_proj", "layers.1.mlp.down_proj"):  # the rank-16 weights are kept
            assert rel_err(dense.get_submodule(name).weight, model.get_submodule(name).weight) < 5e-3
        assert rel_err(dense.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight) > 0.3
    assert len(generate(svd, tokenizer, ["Hello"], GREEDY)[0].token_ids) == 10
