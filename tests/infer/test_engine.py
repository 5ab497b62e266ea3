"""The continuous-batching engine: a step's row count is padded up to a faster one."""

import time

import pytest

from palmkit.infer.engine import Engine
from tests.conftest import Slow

pytestmark = pytest.mark.timeout(120)


class Bumpy(Slow):
    """A model whose steps take 4 times longer with 3 rows than with any other count."""

    def hidden_states(self, idx, *args, **kwargs):
        time.sleep(0.08 if idx.shape[0] == 3 else 0.02)
        return self.inner.hidden_states(idx, *args, **kwargs)


def test_step_rows_pad_up_to_a_faster_row_count(loaded):
    model, tok = loaded
    engine = Engine(Bumpy(model, 0), tok, max_batch=4, autotune=False)
    assert engine.step_rows == [0, 1, 2, 3, 4]
    # 3 running sequences step with 4 rows; the tolerance keeps timing noise from padding the others
    assert engine.tune_step_rows(tolerance=1.5) == [0, 1, 2, 4, 4]
