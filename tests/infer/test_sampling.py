"""Sampling: a seed makes it reproducible, top-k 1 is greedy, invalid parameters are refused; the batched draw
against a hand computation of temperature, top-k and top-p, row by row and whatever else is in the batch; token
log-probabilities against the hand-written formula."""

import math

import pytest
import torch

from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingBatch, SamplingParams, make_generator, sample_batch, token_logprobs
from tests.conftest import random_model


def test_seed_makes_sampling_reproducible(tokenizer):
    model = random_model(tokenizer.vocab_size, seed=2)
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=11, stop_at_eos=False)
    a = generate(model, tokenizer, ["Hello"], p)[0]
    b = generate(model, tokenizer, ["Hello"], p)[0]
    c = generate(model, tokenizer, ["Hello"], SamplingParams(**{**p.__dict__, "seed": 12}))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy(tokenizer):
    model = random_model(tokenizer.vocab_size, seed=4)
    greedy = generate(model, tokenizer, "The", SamplingParams(max_new_tokens=6, temperature=0))[0]
    topk = generate(model, tokenizer, "The", SamplingParams(max_new_tokens=6, temperature=1.5, top_k=1, seed=1))[0]
    assert greedy.token_ids == topk.token_ids


def test_invalid_sampling_params():
    for bad in ({"temperature": float("nan")}, {"temperature": -1}, {"top_p": 0}, {"max_new_tokens": -3},
                {"logprobs": -1}, {"prompt_logprobs": -2}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_token_logprobs_are_logits_minus_their_log_sum_exp():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.2, 3.0, -0.5]])
    out = token_logprobs(logits, [0, 3], k=2)
    for row, lp in zip(logits.tolist(), out, strict=True):
        norm = math.log(sum(math.exp(x) for x in row))
        assert lp.logprob == pytest.approx(row[lp.id] - norm, abs=1e-6)
        best = sorted(range(4), key=lambda i: -row[i])[:2]
        assert [t for t, _ in lp.top] == best
        assert [v for _, v in lp.top] == pytest.approx([row[i] - norm for i in best], abs=1e-6)
    assert [lp.id for lp in out] == [0, 3]
    assert token_logprobs(logits, [1, 2])[0].top == []  # k=0: the token's own only
    assert token_logprobs(logits[:0], []) == []  # a one-token prompt has nothing to score


def hand_draw(row: list[float], p: SamplingParams, u: float) -> int:
    """The token an inverse-CDF draw u in [0, 1) picks, computed in plain Python from the definitions."""
    scaled = [x / p.temperature for x in row]
    order = sorted(range(len(row)), key=lambda i: -scaled[i])
    keep = set(order[: p.top_k or len(row)])
    z = sum(math.exp(scaled[i]) for i in keep)
    probs = {i: math.exp(scaled[i]) / z for i in keep}
    mass, nucleus = 0.0, set()
    for i in order:  # the smallest prefix of the most likely whose mass reaches top_p
        if i not in keep or mass >= p.top_p:
            break
        nucleus.add(i)
        mass += probs[i]
    total = sum(probs[i] for i in nucleus)
    acc = 0.0
    for i in range(len(row)):  # inverse CDF in vocabulary order
        acc += probs[i] if i in nucleus else 0.0
        if acc > u * total:
            return i
    raise AssertionError("u beyond the total")


CASES = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
         SamplingParams(temperature=1.3, top_p=0.6), SamplingParams(temperature=0.9, top_k=4, top_p=0.8)]


@pytest.mark.parametrize("params", CASES, ids=["plain", "top-k", "top-p", "top-k and top-p"])
def test_batched_draw_equals_the_hand_computation(params):
    torch.manual_seed(0)
    logits = torch.randn(40, 7) * 2
    seeds = range(100, 140)
    gens = [make_generator(s, "cpu") for s in seeds]
    got = sample_batch(logits, SamplingBatch([params] * 40, gens)).tolist()
    # each row's uniform is the first draw of its own seeded generator
    us = [torch.rand(1, generator=make_generator(s, "cpu")).item() for s in seeds]
    assert got == [hand_draw(row, params, u) for row, u in zip(logits.tolist(), us, strict=True)]
    assert len(set(got)) > 1  # the draws really differ with the seed


def test_a_row_draws_the_same_alone_or_in_any_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0), CASES[1], CASES[2], SamplingParams(temperature=0), CASES[3], CASES[0]]
    batch = sample_batch(logits, SamplingBatch(params, [make_generator(i, "cpu") for i in range(6)])).tolist()
    alone = [sample_batch(logits[i:i + 1], SamplingBatch([params[i]], [make_generator(i, "cpu")])).item()
             for i in range(6)]
    assert batch == alone
    assert batch[0] == int(logits[0].argmax()) and batch[3] == int(logits[3].argmax())  # greedy rows: argmax
    # another row order and other neighbours give each row the same token
    order = [5, 2, 4, 1]
    shuffled = sample_batch(logits[order], SamplingBatch([params[i] for i in order],
                                                         [make_generator(i, "cpu") for i in order])).tolist()
    assert shuffled == [batch[i] for i in order]


def test_draw_frequencies_follow_the_cut_distribution():
    """Unseeded rows too: 4000 draws of one row land on the top-p nucleus in proportion to its probabilities."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p = SamplingParams(temperature=1.0, top_p=0.75)
    torch.manual_seed(3)
    got = sample_batch(logits.expand(4000, 5), SamplingBatch([p] * 4000, [None] * 4000))
    probs = torch.softmax(logits, -1)
    nucleus = probs[:2] / probs[:2].sum()  # 0.56 + 0.21 reaches 0.75 with the second token
    counts = torch.bincount(got, minlength=5).double() / 4000
    assert counts[2:].sum() == 0
    assert counts[:2].tolist() == pytest.approx(nucleus.tolist(), abs=0.03)
