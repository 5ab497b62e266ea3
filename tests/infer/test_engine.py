"""The continuous-batching engine: a step's row count is padded up to a faster one; log-probabilities of the
prompt and of the generated tokens equal those of a full forward pass."""

import asyncio
import time

import pytest
import torch

from palmkit.errors import PalmkitError
from palmkit.infer import engine as engine_module
from palmkit.infer.engine import (
    Engine,
    EngineBusy,
    EngineOptions,
    Sink,
    auto_max_batch,
    events_of,
    load_engine,
    pick_step_rows,
)
from palmkit.infer.generate import generate_ids
from palmkit.infer.interface import LanguageModel
from palmkit.infer.sampling import SamplingParams
from palmkit.model.fused import FusedBlock
from palmkit.model.palm import KVCache
from tests.conftest import Slow

pytestmark = pytest.mark.timeout(120)


def test_step_rows_pad_up_to_a_faster_row_count():
    # measured times are injected: the choice is tested, never a clock (3 rows 4x slower than 4 rows)
    times = {1: 0.02, 2: 0.021, 3: 0.08, 4: 0.02}
    # 3 running sequences step with 4 rows; the tolerance keeps timing noise (2 rows 5% slower) from padding
    assert pick_step_rows(times, 4, tolerance=1.1) == [0, 1, 2, 4, 4]
    assert pick_step_rows(times, 4, tolerance=5) == [0, 1, 2, 3, 4]
    # past 16 only multiples of 8 are timed: 17..24 running step with 24 rows, or 32 when that is faster
    sparse = {16: 0.1, 24: 0.3, 32: 0.12}
    assert pick_step_rows(sparse, 32)[17:] == [32] * 16


def test_tune_step_rows_times_every_candidate_count(loaded, monkeypatch):
    model, tok = loaded
    assert isinstance(model, LanguageModel)  # the interface the engine is written against
    engine = Engine(model, tok, max_batch=20, autotune=False)
    assert engine.step_rows == list(range(21))
    times = engine.time_step_rows()
    assert sorted(times) == [*range(1, 17), 20] and all(t > 0 for t in times.values())
    monkeypatch.setattr(engine, "time_step_rows", lambda: {**dict.fromkeys(range(1, 17), 1.0), 20: 0.5})
    assert engine.tune_step_rows() == [0, *[20] * 20]


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


@pytest.mark.parametrize("prefill", [128, 2], ids=["whole prompts", "chunked prefill"])
def test_logprobs_equal_a_full_forward_pass(loaded, monkeypatch, prefill):
    model, tok = loaded
    prompts = [tok.encode("The quick brown fox", bos=True), tok.encode("Der", bos=True)]
    greedy = SamplingParams(max_new_tokens=7, temperature=0, stop_at_eos=False, logprobs=3, prompt_logprobs=3)
    sampled = SamplingParams(max_new_tokens=5, temperature=1.0, seed=1, stop_at_eos=False, logprobs=0)
    scored = SamplingParams(max_new_tokens=0, prompt_logprobs=2)
    monkeypatch.setattr(engine_module, "PROMPT_LOGPROB_ROWS", 2)  # several chunks per prompt
    requests = [(prompts[0], greedy), (prompts[1], sampled), (prompts[1], scored)]
    # chunked: 2 prompt tokens a step over all sequences, so prompts are prefilled while others decode
    events = run_engine(Engine(model, tok, max_batch=3, autotune=False, prefill_tokens=prefill), requests)
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
    """Two slots and no queue: once both of two sequences are taken from the queue (in their slots or still being
    admitted) and prefill, a third is refused."""
    model, tok = loaded
    engine = Engine(Slow(model, 0.3), tok, max_batch=2, max_queue=0, autotune=False).start()
    sink = Sink(asyncio.new_event_loop())
    params = SamplingParams(max_new_tokens=2, temperature=0)
    try:
        engine.submit([([1, 5], params), ([1, 6], params)], sink)
        deadline = time.monotonic() + 10
        while engine.queue_depth:  # both taken from the queue: slots held, prefills under way
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(EngineBusy):
            engine.submit([([1, 7], params)], sink)
    finally:
        engine.stop()


def test_the_default_batch_is_64_unless_its_cache_would_take_over_a_quarter_of_free_memory(loaded):
    model, _ = loaded
    row = sum(t.numel() * t.element_size() for t in (*KVCache(model.config, 1).k, *KVCache(model.config, 1).v))
    assert auto_max_batch(model, free_bytes=1 << 50) == 64
    assert auto_max_batch(model, free_bytes=4 * 10 * row) == 10  # a quarter of it holds 10 rows
    assert auto_max_batch(model, free_bytes=4 * 10 * row - 1) == 9
    assert auto_max_batch(model, free_bytes=0) == 1
    assert 1 <= auto_max_batch(model) <= 64  # this machine's free memory


def test_a_prefill_budget_below_one_token_is_refused(loaded):
    model, tok = loaded
    with pytest.raises(PalmkitError, match="prefill_tokens"):
        Engine(model, tok, prefill_tokens=0, autotune=False)


class Poisoned(Slow):
    """The same model, failing any prefill chunk that holds token 99."""

    def hidden_states(self, idx, *args, **kwargs):
        if idx.shape[1] > 1 and (idx == 99).any():
            raise RuntimeError("poisoned prompt")
        return self.inner.hidden_states(idx, *args, **kwargs)


def test_a_failed_chunked_prefill_fails_only_its_sequence(loaded):
    model, tok = loaded
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_at_eos=False)
    # the poisoned prompt fails in its second chunk, after a later sequence took the slot behind it
    prompts = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 99, 12], [1, 13], [1, 14, 15]]
    events = run_engine(Engine(Poisoned(model, 0), tok, max_batch=4, autotune=False, prefill_tokens=3),
                        [(p, params) for p in prompts])
    assert [ev.error for ev in events if ev.index == 1][-1] == "generation failed: poisoned prompt"
    for i in (0, 2, 3):  # the others, moved between slots when it left, give generate()'s tokens
        assert all(ev.error is None for ev in events if ev.index == i)
        want = [row[0] for row in generate_ids(model, [prompts[i]], params)]
        assert "".join(ev.text for ev in events if ev.index == i) == tok.decode(want)


@pytest.mark.parametrize("changes", [dict(fuse=True, weight_layout="rows"), dict(weight_layout="columns"),
                                     dict(fuse=True)], ids=["fused", "column-major", "fused, column-major"])
def test_runtime_layouts_serve_the_tokens_and_logprobs_of_the_plain_model(checkpoint, loaded, changes):
    model, tok = loaded
    engine, _ = load_engine(checkpoint, EngineOptions(max_batch=2, autotune=False, **changes))
    assert all(isinstance(layer, FusedBlock) for layer in engine.model.layers) == changes.get("fuse", False)
    weights = [p for p in engine.model.parameters() if p.dim() == 2]
    # auto is column-major for float32 on a CPU: each weight is the transpose of a contiguous matrix
    assert all(w.t().is_contiguous() != (changes.get("weight_layout") == "rows") for w in weights)
    plain = dict(model.named_parameters())
    if not changes.get("fuse"):
        assert all(torch.equal(w, plain[n]) for n, w in engine.model.named_parameters())  # the same values
    prompts = [tok.encode("The quick brown fox", bos=True), tok.encode("Der", bos=True)]
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_at_eos=False, logprobs=0)
    events = run_engine(engine, [(p, params) for p in prompts])
    want = list(generate_ids(model, prompts, params))  # the plain model's greedy tokens, step by step
    for i, prompt in enumerate(prompts):
        got = [lp for ev in events if ev.index == i for lp in ev.logprobs or ()]
        assert [lp.id for lp in got] == [step[i] for step in want]
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt + [lp.id for lp in got]]))[0].float(), -1)
        for t, lp in enumerate(got, start=len(prompt)):
            assert lp.logprob == pytest.approx(ref[t - 1, lp.id].item(), abs=1e-4)


def test_a_request_whose_reader_is_behind_waits_until_it_has_read(loaded):
    """A sink with UNREAD_EVENTS events unread gets no decode step (another request is served meanwhile); once
    they are read, it finishes."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=4, autotune=False).start()
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_at_eos=False)

    async def scenario():
        behind, other = Sink(), Sink()
        for _ in range(engine_module.UNREAD_EVENTS):
            behind.queue.put_nowait(None)  # what a client that stopped reading leaves in its queue
        [seq] = engine.submit([([1, 5, 6], params)], behind)
        served = [ev async for ev in events_of(other, len(engine.submit([([1, 7], params)], other)))]
        assert served[-1].completion_tokens == 6
        assert len(seq.tokens) == 1 and seq.written == 3  # prefilled (its first token), then no decode step
        while not behind.queue.empty():  # the reader catches up
            behind.queue.get_nowait()
        events = [ev async for ev in events_of(behind, 1)]
        assert events[-1].completion_tokens == 6 and len(seq.tokens) == 6

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()
