"""The causal-LM loss with z-loss: plain, and fused (chunked through the output layer) with the same gradients."""

import pytest
import torch
import torch.nn.functional as F

from palmkit.model.loss import fused_lm_loss, lm_loss


def test_loss_is_cross_entropy_plus_z_loss():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 0] = -100
    total, ce, z = lm_loss(logits, targets, z_loss=1e-4)
    valid = targets != -100
    ref_ce = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][valid].mean()
    ref_z = 1e-4 * torch.logsumexp(logits, -1)[valid].pow(2).mean()
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(z, ref_z)
    torch.testing.assert_close(total, ref_ce + ref_z)


def _loss_and_grads(loss_fn, *inputs):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = loss_fn(*inputs)
    out[0].backward()
    return [o.detach() for o in out], [x.grad for x in inputs]


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_fused_loss_equals_lm_loss_and_its_gradients(chunk):
    torch.manual_seed(0)
    h, w = torch.randn(3, 21, 16), torch.randn(500, 16)
    targets = torch.randint(0, 500, (3, 21))
    targets[0, :4] = targets[2, -1] = -100
    scale, z = 16 ** -0.5 * 4, 1e-2  # a z-loss large enough to show in the gradients

    def reference(h, w):
        return lm_loss(F.linear(h, w) * scale, targets, z)

    ref, ref_grads = _loss_and_grads(reference, h, w)
    got, grads = _loss_and_grads(lambda h, w: fused_lm_loss(h, w, targets, scale, z, chunk=chunk), h, w)
    for a, b in zip([*got, *grads], [*ref, *ref_grads], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the path that makes no gradients gives the same values
        for a, b in zip(fused_lm_loss(h, w, targets, scale, z, chunk=chunk), ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_loss_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    h, w = torch.randn(64, 32), torch.randn(300, 32) * 0.3
    targets = torch.randint(0, 300, (64,))
    (ref, *_), (gh, gw) = _loss_and_grads(lambda h, w: lm_loss(F.linear(h, w), targets), h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (got, *_), (bh, bw) = _loss_and_grads(lambda h, w: fused_lm_loss(h, w, targets, chunk=16), h, w)
    assert got.dtype == bh.dtype == bw.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=0)
    assert (bh - gh).norm() / gh.norm() < 1e-2 and (bw - gw).norm() / gw.norm() < 1e-2
