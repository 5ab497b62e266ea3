import asyncio
import io

import pytest
import torch

from palmkit.infer.engine import Engine, Sink, events_of
from palmkit.infer.generate import generate, generate_ids, stream_to
from palmkit.infer.sampling import SamplingParams
from palmkit.infer.text_stream import TextStream
from palmkit.model.palm import preset
from tests.conftest import Scripted, random_model


def greedy_full_recompute(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_cached_greedy_equals_full_recompute_for_unequal_batch():
    model = random_model(300, seed=1)
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 50], [1, 7, 90, 7, 200]]
    steps = list(generate_ids(model, prompts, SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)))
    for i, prompt in enumerate(prompts):
        got = [s[i] for s in steps if s[i] is not None]
        ref = greedy_full_recompute(model, prompt, 12)
        assert got == ref
        assert len(set(ref)) > 2  # the check is not vacuous: the output varies


def test_batch_result_independent_of_neighbours():
    model = random_model(300, seed=2)
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=5, stop_at_eos=False)
    alone = [s[0] for s in generate_ids(model, [[1, 9, 8, 7]], params)]
    together = [s[1] for s in generate_ids(model, [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 9, 8, 7]], params)]
    assert alone == together


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


def test_max_new_tokens_and_finish_reason(tokenizer):
    model = random_model(tokenizer.vocab_size, seed=4)
    out = generate(model, tokenizer, ["a", "bcd"], SamplingParams(max_new_tokens=5, temperature=0,
                                                                   stop_at_eos=False))
    assert [len(o.token_ids) for o in out] == [5, 5]
    assert {o.finish_reason for o in out} == {"length"}


def test_stop_string_cuts_text(tokenizer):
    model = random_model(tokenizer.vocab_size, seed=4)
    full = generate(model, tokenizer, "x", SamplingParams(max_new_tokens=20, temperature=0, stop_at_eos=False))[0]
    stop = full.text[3:5]
    cut = generate(model, tokenizer, "x", SamplingParams(max_new_tokens=20, temperature=0, stop=[stop],
                                                         stop_at_eos=False))[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"


def test_prompt_longer_than_context_is_an_error(tokenizer):
    model = random_model(tokenizer.vocab_size)
    with pytest.raises(ValueError, match="does not fit the context"):
        list(generate_ids(model, [[1] * 300], SamplingParams()))


def test_invalid_sampling_params():
    for bad in ({"temperature": float("nan")}, {"temperature": -1}, {"top_p": 0}, {"max_new_tokens": -3}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_text_stream_holds_incomplete_utf8_and_stop_prefixes(tokenizer):
    ids = tokenizer.encode("素早い END more")
    stream = TextStream(tokenizer, stop=["END"])
    shown = "".join(stream.push(i) for i in ids) + stream.finish()
    assert shown == "素早い " and stream.stopped
    stream = TextStream(tokenizer)
    deltas = [stream.push(i) for i in tokenizer.encode("😀ok")]
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) + stream.finish() == "😀ok"


def engine_run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) of one request run through the serving engine."""

    async def run():
        sink = Sink()
        engine.submit([(prompt, params)], sink)
        return [e async for e in events_of(sink, 1)]

    events = asyncio.run(run())
    assert events[-1].error is None
    return "".join(e.text for e in events), events[-1].finish_reason, events[-1].completion_tokens


@pytest.mark.parametrize("case", ["eos", "stop string", "max tokens", "context"])
def test_generate_and_the_engine_stop_at_the_same_token(tokenizer, case):
    prompt = tokenizer.encode("Hi", bos=True)
    words = tokenizer.encode("one two END three four five six seven")
    script = [*words[:4], tokenizer.eos_id, *words[4:]] if case == "eos" else words
    # the last token is never fed back: a context of prompt + 2 leaves room for 3 new tokens
    context = len(prompt) + 2 if case == "context" else 256
    model = Scripted(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=context), script, len(prompt))
    params = SamplingParams(max_new_tokens=4 if case == "max tokens" else 20, temperature=0,
                            stop=["END"] if case == "stop string" else ())
    done = generate(model, tokenizer, "Hi", params)[0]
    engine = Engine(model, tokenizer, max_batch=2, autotune=False).start()
    try:
        served = engine_run(engine, prompt, params)
    finally:
        engine.stop()
    # the engine counts a stop token it generated; generate() leaves it out of token_ids
    assert served == (done.text, done.finish_reason, len(done.token_ids) + (case == "eos"))
    expected = {"eos": (script[:4], "stop"), "max tokens": (script[:4], "length"),
                "context": (script[:3], "length")}
    if case in expected:
        assert (done.token_ids, done.finish_reason) == expected[case]
    else:
        assert done.finish_reason == "stop" and "END" not in done.text
        assert done.text == tokenizer.decode(words).split("END")[0] and len(done.token_ids) < len(words)


def test_stream_to_writes_what_it_returns(tokenizer):
    model = random_model(tokenizer.vocab_size, seed=4)
    out = io.StringIO()
    done = stream_to(model, tokenizer, "The", SamplingParams(max_new_tokens=8, temperature=0), out)
    assert out.getvalue() == done.text
