"""oneDNN-packed weights: the packed GEMM path is exact in fp32 and generates like the plain model."""

import copy

import pytest
import torch

from palmkit.infer.generate import generate_ids
from palmkit.model.packed import pack_for_cpu
from tests.model.conftest import GREEDY

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def test_packed_gemm_path_is_exact_in_fp32(model, tokens):
    packed = pack_for_cpu(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(packed(tokens), model(tokens), rtol=0, atol=1e-5)
    assert set(packed.state_dict()) == set(model.state_dict())
    assert list(generate_ids(packed, [[1, 4, 5]], GREEDY)) == list(generate_ids(model, [[1, 4, 5]], GREEDY))
