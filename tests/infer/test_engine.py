"""The continuous-batching engine: a step's row count is padded up to a faster one; log-probabilities of the
prompt and of the generated tokens equal those of a full forward pass."""

import asyncio
import time

import pytest
import torch

from palmkit.infer import engine as engine_module
from palmkit.infer.engine import Engine, EngineBusy, Sink, events_of
from palmkit.infer.sampling import SamplingParams
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


def run_engine(engine: Engine, requests: list) -> list:
    """Every event of `requests` (prompt ids, params) submitted together."""

    async def collect():
        sink = Sink()
        return [ev async for ev in events_of(sink, len(engine.submit(requests, sink)))]

    engine.start()
    try:
        return asyncio.run(collect())
    finally:
        engine.stop()


def test_logprobs_equal_a_full_forward_pass(loaded, monkeypatch):
    model, tok = loaded
    prompts = [tok.encode("The quick brown fox", bos=True), tok.encode("Der", bos=True)]
    greedy = SamplingParams(max_new_tokens=7, temperature=0, stop_at_eos=False, logprobs=3, prompt_logprobs=3)
    sampled = SamplingParams(max_new_tokens=5, temperature=1.0, seed=1, stop_at_eos=False, logprobs=0)
    scored = SamplingParams(max_new_tokens=0, prompt_logprobs=2)
    monkeypatch.setattr(engine_module, "PROMPT_LOGPROB_ROWS", 2)  # several chunks per prompt
    requests = [(prompts[0], greedy), (prompts[1], sampled), (prompts[1], scored)]
    events = run_engine(Engine(model, tok, max_batch=3, autotune=False), requests)
    for i, (prompt, params) in enumerate(requests):
        mine = [ev for ev in events if ev.index == i]
        assert mine[0].prompt_logprobs is not None or params.prompt_logprobs is None
        assert all(ev.prompt_logprobs is None for ev in mine[1:])  # once, on the first event
        generated = [lp for ev in mine for lp in ev.logprobs or ()]
        ids = prompt + [lp.id for lp in generated]
        assert len(generated) == (params.max_new_tokens if params.logprobs is not None else 0)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        scored_lps = (mine[0].prompt_logprobs or []) if params.prompt_logprobs is not None else []
        positions = [*(range(1, len(prompt)) if scored_lps else ()), *range(len(prompt), len(ids))]
        lps = [*scored_lps, *generated]
        assert [lp.id for lp in lps] == [ids[t] for t in positions]
        for t, lp in zip(positions, lps, strict=True):
            assert lp.logprob == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
            k = params.prompt_logprobs if t < len(prompt) else params.logprobs
            top = ref[t - 1].topk(k)
            assert [a for a, _ in lp.top] == top.indices.tolist()
            assert [b for _, b in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            if params.temperature == 0 and t >= len(prompt):
                assert ids[t] == int(ref[t - 1].argmax())
    assert [(ev.finish_reason, ev.completion_tokens) for ev in events if ev.index == 2] == [("length", 0)]


def test_the_queue_bound_counts_the_sequences_being_admitted(loaded):
    """Two slots and no queue: while the first of two admitted sequences prefills (the second taken from the
    queue, not yet in its slot), a third is refused."""
    model, tok = loaded
    engine = Engine(Slow(model, 0.3), tok, max_batch=2, max_queue=0, autotune=False).start()
    sink = Sink(asyncio.new_event_loop())
    params = SamplingParams(max_new_tokens=2, temperature=0)
    try:
        engine.submit([([1, 5], params), ([1, 6], params)], sink)
        deadline = time.monotonic() + 10
        while not (engine.queue_depth == 0 and engine.running == 1):  # the first prefills, the second waits
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(EngineBusy):
            engine.submit([([1, 7], params)], sink)
    finally:
        engine.stop()
