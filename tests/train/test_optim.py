"""PaLM's Adafactor as multi-tensor kernels, against its formula written as a plain per-parameter loop."""

import torch

from palmkit.train.optim import PaLMAdafactor


def reference_step(p, g, state, lr, beta1=0.9, decay_rate=0.8, eps=1e-30, scale_eps=1e-3, clip=1.0):
    """PaLM section 5, one parameter at a time (the loop the fused optimiser replaces)."""
    state["step"] = state.get("step", 0) + 1
    k = state["step"]
    beta2 = 1.0 - k ** -decay_rate
    v = state["v"] = beta2 * state.get("v", torch.zeros_like(p)) + (1 - beta2) * (g.square() + eps)
    u = g / v.sqrt()
    u = u / max(1.0, float(u.square().mean().sqrt()) / clip)
    m = state["m"] = beta1 * state.get("m", torch.zeros_like(p)) + (1 - beta1) * u
    scale = max(scale_eps, float(p.square().mean().sqrt()))
    return p * (1 - lr**2) - lr * scale * m


def test_adafactor_matches_its_formula_over_steps():
    torch.manual_seed(0)
    # an embedding-like matrix, a kernel, a LayerNorm scale, and a zero vector (its step scale is scale_eps)
    shapes = [(50, 8), (8, 24), (8,), (5,)]
    params = [torch.nn.Parameter(torch.randn(s) * (0.2 if len(s) == 2 else 1.0)) for s in shapes]
    with torch.no_grad():
        params[3].zero_()
    expected = [p.detach().clone() for p in params]
    states = [{} for _ in params]
    opt = PaLMAdafactor(params, lr=3e-2)
    for step in range(6):
        lr = 3e-2 * (step + 1) / 6  # a schedule changes lr between steps
        opt.param_groups[0]["lr"] = lr
        for i, p in enumerate(params):
            if i == 2 and step == 2:  # a step without a gradient: its own step count falls behind
                p.grad = None
                continue
            p.grad = torch.randn(p.shape) * (100.0 if step == 4 else 1.0)  # a spike that the RMS clip catches
            expected[i] = reference_step(expected[i], p.grad, states[i], lr)
        opt.step()
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)
    assert float(opt.state[params[2]]["step"]) == 5 and float(opt.state[params[0]]["step"]) == 6


def test_adafactor_state_round_trips():
    """A state dict saved mid-run continues to the same weights as the run that never stopped."""
    torch.manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.ones(4))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    grads = [[torch.randn(p.shape) for p in a] for _ in range(4)]
    opt_a = PaLMAdafactor(a, lr=1e-2)
    opt_b = PaLMAdafactor(b, lr=1e-2)
    for i, gs in enumerate(grads):
        if i == 2:
            saved = opt_b.state_dict()
            opt_b = PaLMAdafactor(b, lr=1e-2)
            opt_b.load_state_dict(saved)
        for params, opt in ((a, opt_a), (b, opt_b)):
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
