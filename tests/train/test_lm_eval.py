"""Held-out LM evaluation: the loss is the mean over all unmasked tokens, not a mean of means."""

import pytest
import torch


def test_mean_lm_loss_is_the_mean_over_all_unmasked_tokens():
    import torch.nn.functional as F

    from palmkit.model.palm import build_model, preset
    from palmkit.train.lm_eval import mean_lm_loss

    model = build_model(preset("tiny", vocab_size=100), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for rows, length, masked in ((2, 7, 3), (3, 5, 4)):  # batches of unequal sizes: a mean of means would be wrong
        x = torch.randint(3, 100, (rows, length), generator=g)
        y = torch.randint(3, 100, (rows, length), generator=g)
        y[0, :masked] = -100
        batches.append((x, y))
    loss, n = mean_lm_loss(model, batches)
    with torch.no_grad():
        logits = torch.cat([model(x).flatten(0, 1) for x, _ in batches])
    targets = torch.cat([y.flatten() for _, y in batches])
    assert n == int((targets != -100).sum()) == 2 * 7 + 3 * 5 - 3 - 4
    assert loss == pytest.approx(F.cross_entropy(logits, targets, ignore_index=-100).item(), rel=1e-5)
