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


def test_embedding_learning_rate_group():
    from palmkit.model.palm import build_model, preset
    from palmkit.train.step import make_optimizer

    model = build_model(preset("tiny", vocab_size=100))
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, embed_lr_ratio=10.0)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = (1e-2, 0.1) if name == "embed_tokens.weight" else (1e-3, 0.1 if p.dim() == 2 else 0.0)
        assert lr_of[id(p)] == expected, name
    # at ratio 1 the two groups AdamW always had, so that optimiser states saved before still load
    assert len(make_optimizer(model, lr=1e-3, weight_decay=0.1, embed_lr_ratio=1.0).param_groups) == 2
    assert len(opt.param_groups) == 3


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_skips_the_update(bad):
    """A finite loss can still give an inf or nan gradient: the step is skipped, not applied as nans."""
    from palmkit.train.step import make_optimizer, optimizer_step

    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model, lr=1e-1)
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = bad
    norm = optimizer_step(model, opt, grad_clip=1.0)
    assert not torch.isfinite(norm)
    for p, p0 in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0)
        assert p.grad is None  # cleared for the next batch
    model(torch.ones(1, 3)).sum().backward()
    optimizer_step(model, opt, grad_clip=1.0)  # a finite one is applied
    assert not torch.equal(model.weight.detach(), before[0])
