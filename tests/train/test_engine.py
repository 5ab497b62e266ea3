"""The training engine's parts: a global batch split over ranks and micro-batches gives one process's step, the
schedule is applied to every parameter group, the clock, periodic work, refused options."""

import pytest
import torch
import torch.nn.functional as F

from palmkit.errors import PalmkitError
from palmkit.train.config import EngineConfig, TrainConfig, engine_config
from palmkit.train.distributed import Dist
from palmkit.train.engine import BudgetClock, Engine, LRSchedule, every, rank_share
from palmkit.train.step import lr_factor
from tests.conftest import random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def test_rank_shares_cover_the_batch_in_order_with_equal_micro_batch_counts():
    batch = list(range(11))
    for world in (1, 2, 3, 4):
        shares = [rank_share(batch, Dist(rank=r, world_size=world), micro=2) for r in range(world)]
        assert [x for share in shares for mb in share for x in mb] == batch
        assert len({len(share) for share in shares}) == 1  # the gradient sync is on the same micro-batch
        assert all(len(mb) <= 2 for share in shares for mb in share)
    assert rank_share(list(range(3)), Dist(rank=3, world_size=4), micro=8) == [[]]  # nothing left: one empty


def _token_loss(model, batch):
    ids, targets = batch
    return model(ids, targets=targets)  # (total, cross-entropy, z-loss), means over the targets that are not -100


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (6, 10), generator=g)
    targets = ids.roll(-1, 1).clone()
    targets[0, 3:] = -100  # rows with different numbers of targets: a plain mean of micro-batch means is wrong
    targets[4, 1:] = -100
    return ids, targets


def test_micro_batches_weighted_by_their_targets_give_the_whole_batch_step():
    ids, targets = _batch()
    runs = []
    for cuts in ([6], [1, 2, 3]):  # one micro-batch, or three of unequal sizes and target counts
        model = random_model(64, seed=1).train()
        engine = Engine(model, EngineConfig(), Dist(), 1e-3, LRSchedule(0, 10))
        micro = [((i, t), int((t != -100).sum())) for i, t in zip(ids.split(cuts), targets.split(cuts), strict=True)]
        result = engine.train_step(micro, _token_loss, step=0)
        runs.append((result, {k: v.clone() for k, v in model.state_dict().items()}))
    (one, w1), (three, w3) = runs
    # the reported loss is the mean over every target, by hand
    model = random_model(64, seed=1)
    with torch.no_grad():
        logits = model(ids)
    by_hand = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert one.losses[1] == pytest.approx(by_hand.item(), abs=1e-5)
    assert three.losses == pytest.approx(one.losses, abs=1e-5)
    assert three.grad_norm == pytest.approx(one.grad_norm, rel=1e-4)
    for k in w1:  # AdamW's first step is about lr x sign(gradient): 2% of it allowed for rounding
        torch.testing.assert_close(w3[k], w1[k], rtol=0, atol=2e-5)


def test_schedule_is_applied_to_every_group_and_a_zero_weight_micro_batch_adds_nothing():
    model = random_model(64, seed=2).train()
    schedule = LRSchedule(warmup=4, total=20, min_ratio=0.1)
    engine = Engine(model, EngineConfig(), Dist(), 1e-2, schedule, weight_decay=0.1, embed_lr_ratio=10.0)
    engine.set_lr(7)
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx(
        [1e-2 * lr_factor(7, 4, 20, 0.1), 1e-2 * lr_factor(7, 4, 20, 0.1), 1e-1 * lr_factor(7, 4, 20, 0.1)])
    ids, targets = _batch(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = engine.train_step([((ids, targets), 0)], _token_loss, step=0)  # no targets: a zero gradient
    assert result.grad_norm == 0.0 and not result.skipped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k.endswith("layernorm.weight"))


def test_clip_zero_means_no_clipping():
    ids, targets = _batch(4)
    norms = []
    for clip in (0.0, 1e-6):
        model = random_model(64, seed=3).train()
        engine = Engine(model, EngineConfig(grad_clip=clip), Dist(), 1e-3, LRSchedule(0, 10))
        engine.train_step([((ids, targets), 1)], _token_loss, step=0)
        norms.append(sum(float((p - q).detach().abs().sum()) for p, q in
                         zip(model.parameters(), random_model(64, seed=3).parameters(), strict=True)))
    assert norms[0] > 0 and norms[1] > 0  # AdamW moves by ~lr whatever the clip: both updated, neither zeroed


def test_budget_clock_and_every(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr("palmkit.train.engine.time.perf_counter", lambda: next(ticks) * 1.0)
    clock = BudgetClock(minutes=1.0, before=30.0, d=Dist())  # reads 0
    assert clock.elapsed() == 31.0 and clock.seconds() == 32.0 and clock.fraction(45.0) == 0.75
    assert BudgetClock(0.0, 0.0, Dist()).fraction(10.0) == 0.0
    assert [s for s in range(1, 11) if every(s, 4)] == [4, 8] and every(9, 0, last=True) and not every(9, 0)


def test_options_reach_the_engine_and_bad_ones_are_refused():
    assert engine_config(TrainConfig(dtype="bfloat16", grad_clip=0.5)) == EngineConfig(dtype="bfloat16",
                                                                                       grad_clip=0.5)
    with pytest.raises(PalmkitError, match="float16 needs a GPU"):
        Engine(random_model(64), EngineConfig(dtype="float16"), Dist(), 1e-3, LRSchedule(0, 1))
