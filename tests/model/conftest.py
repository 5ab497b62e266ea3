"""What the tests of the model's alternative linear layers share: a tiny model, a batch of tokens, greedy decoding."""

import pytest
import torch

from palmkit.infer.sampling import SamplingParams
from tests.conftest import random_model

GREEDY = SamplingParams(max_new_tokens=10, temperature=0, stop_at_eos=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.fixture
def model():
    return random_model(300, seed=1)


@pytest.fixture
def tokens():
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
