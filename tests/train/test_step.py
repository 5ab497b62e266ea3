"""One optimisation step: learning-rate schedules, PaLM's Adafactor, the optimiser's parameter groups."""

import pytest
import torch

from palmkit.train.step import PaLMAdafactor, lr_factor


def test_schedules():
    # 10 warm-up steps, then a cosine over 100 steps down to 10% of the peak
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(39, 10, 2000, schedule="rsqrt") == pytest.approx(0.5)
    # A timed run decays by the share of its time spent, or by steps when those run out first
    assert lr_factor(20, 10, 0, 0.1, time_fraction=0.5) == pytest.approx(0.55)
    assert lr_factor(20, 10, 0, 0.1, time_fraction=1.0) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1, time_fraction=0.1) == pytest.approx(0.55)
    assert lr_factor(20, 10, 100, 0.1, time_fraction=0.5) == pytest.approx(0.55)


def test_adafactor_matches_its_formula():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    g = torch.randn(4, 3)
    p0 = p.detach().clone()
    opt = PaLMAdafactor([p], lr=1e-2)
    p.grad = g.clone()
    opt.step()
    v = g.square() + 1e-30  # beta2 = 1 - 1**-0.8 = 0 at step 1
    u = g / v.sqrt()
    u = u / max(1.0, float(u.square().mean().sqrt()))
    m = 0.1 * u
    scale = max(1e-3, float(p0.square().mean().sqrt()))
    expected = p0 * (1 - 1e-4) - 1e-2 * scale * m
    torch.testing.assert_close(p.detach(), expected)


def test_weight_decay_only_on_matrices():
    from palmkit.model.palm import build_model, preset
    from palmkit.train.step import make_optimizer

    model = build_model(preset("tiny", vocab_size=100))
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() == 2), name


def test_only_trainable_parameters_are_optimised():
    from palmkit.model.palm import build_model, preset
    from palmkit.train.step import make_optimizer

    model = build_model(preset("tiny", vocab_size=100))
    model.embed_tokens.weight.requires_grad_(False)
    for source in (model, model.parameters()):
        opt = make_optimizer(source, lr=1e-3)
        kept = {id(p) for g in opt.param_groups for p in g["params"]}
        assert kept == {id(p) for p in model.parameters() if p.requires_grad}
        assert all(g["lr"] == 1e-3 for g in opt.param_groups)
