"""Sampling: a seed makes it reproducible, top-k 1 is greedy, invalid parameters are refused; token
log-probabilities against the hand-written formula."""

import math

import pytest
import torch

from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams, token_logprobs
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
