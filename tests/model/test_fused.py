"""Fused projections: logits, gradients and cache equal the plain model's, and a fused model saves the plain layout."""

import copy

import pytest
import torch

from palmkit.infer.generate import generate_ids
from palmkit.io import load_tensors
from palmkit.model.checkpoint import load_checkpoint, save_checkpoint
from palmkit.model.fused import FusedBlock, fuse_projections, unfuse_projections
from palmkit.model.loss import lm_loss
from palmkit.model.palm import KVCache
from tests.conftest import random_model
from tests.model.conftest import GREEDY, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def test_fused_logits_gradients_and_cache_match_plain(model, tokens):
    fused = fuse_projections(copy.deepcopy(model))
    assert all(isinstance(b, FusedBlock) for b in fused.layers)
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), model(tokens), rtol=0, atol=1e-5)
    for m in (model, fused):
        lm_loss(m(tokens[:, :-1]), tokens[:, 1:])[0].backward()
    block, plain = fused.layers[0], model.layers[0]
    grads = block.in_proj.weight.grad.split(block.sizes)
    parts = [plain.self_attn.q_proj, plain.self_attn.k_proj, plain.self_attn.v_proj, plain.mlp.gate_proj,
             plain.mlp.up_proj]
    for g, p in zip(grads, parts, strict=True):
        torch.testing.assert_close(g, p.weight.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.embed_tokens.weight.grad, model.embed_tokens.weight.grad, rtol=0, atol=1e-5)
    prompts = [[1, 5, 6, 7, 8], [1, 50, 9]]
    assert list(generate_ids(fused, prompts, GREEDY)) == list(generate_ids(model, prompts, GREEDY))
    with torch.no_grad():  # one cached decode step, compared as logits rather than tokens
        outs = []
        for m in (model, fused):
            cache = KVCache(m.config, 2, 32)
            m.hidden_states(tokens[:, :8], cache=cache)
            outs.append(m(tokens[:, 8:9], torch.full((2, 1), 8), cache=cache))
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_fused_training_saves_the_plain_layout(model, tokens, tmp_path, tokenizer):
    model = random_model(tokenizer.vocab_size, seed=1)
    tokens = tokens % tokenizer.vocab_size
    fused = fuse_projections(copy.deepcopy(model)).train()
    optimizer = torch.optim.AdamW(fused.parameters(), lr=1e-2)
    lm_loss(fused(tokens[:, :-1]), tokens[:, 1:])[0].backward()
    optimizer.step()
    save_checkpoint(tmp_path / "c", fused.eval(), tokenizer)
    assert set(load_tensors(tmp_path / "c" / "model.safetensors")) == set(model.state_dict())
    loaded, _, config = load_checkpoint(tmp_path / "c")
    assert "quantization" not in config and "low_rank" not in config
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), fused(tokens), rtol=0, atol=1e-5)
        assert rel_err(loaded(tokens), model(tokens)) > 1e-3  # the step changed the weights that were saved
        unfused = unfuse_projections(fused)
        assert set(unfused.state_dict()) == set(model.state_dict())
        torch.testing.assert_close(unfused(tokens), loaded(tokens), rtol=0, atol=1e-5)
