"""The stop rule: `generate` and the serving engine stop at the same token for the same reason."""

import asyncio

import pytest

from palmkit.infer.engine import Engine, Sink, events_of
from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams
from palmkit.model.palm import preset
from tests.conftest import Scripted


def engine_run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) of one request run through the serving engine."""

    async def run():
        sink = Sink()
        engine.submit([(prompt, params)], sink)
        return [e async for e in events_of(sink, 1)]

    events = asyncio.run(run())
    assert events[-1].error is None
    return "".join(e.text for e in events), events[-1].finish_reason, events[-1].completion_tokens


@pytest.mark.parametrize("case", ["eos", "end of turn", "stop string", "max tokens", "context"])
def test_generate_and_the_engine_stop_at_the_same_token(tokenizer, case):
    prompt = tokenizer.encode("Hi", bos=True)
    words = tokenizer.encode("one two END three four five six seven")
    # the chat template's <|end|> ends a generation like EOS: the export lists both as eos_token_id
    ends = {"eos": tokenizer.eos_id, "end of turn": tokenizer.sp.piece_to_id("<|end|>")}
    script = [*words[:4], ends[case], *words[4:]] if case in ends else words
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
    assert served == (done.text, done.finish_reason, len(done.token_ids) + (case in ends))
    expected = {"eos": (script[:4], "stop"), "end of turn": (script[:4], "stop"), "max tokens": (script[:4], "length"),
                "context": (script[:3], "length")}
    if case in expected:
        assert (done.token_ids, done.finish_reason) == expected[case]
    else:
        assert done.finish_reason == "stop" and "END" not in done.text
        assert done.text == tokenizer.decode(words).split("END")[0] and len(done.token_ids) < len(words)
