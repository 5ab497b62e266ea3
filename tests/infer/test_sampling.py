"""Sampling: a seed makes it reproducible, top-k 1 is greedy, invalid parameters are refused."""

import pytest

from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams
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
    for bad in ({"temperature": float("nan")}, {"temperature": -1}, {"top_p": 0}, {"max_new_tokens": -3}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
