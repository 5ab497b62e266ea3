"""Incremental detokenisation: incomplete UTF-8 and stop-string prefixes are held back."""

import random

from palmkit.infer.text_stream import TextStream


def test_text_stream_holds_incomplete_utf8_and_stop_prefixes(tokenizer):
    ids = tokenizer.encode("素早い END more")
    stream = TextStream(tokenizer, stop=["END"])
    shown = "".join(stream.push(i) for i in ids) + stream.finish()
    assert shown == "素早い " and stream.stopped
    stream = TextStream(tokenizer)
    deltas = [stream.push(i) for i in tokenizer.encode("😀ok")]
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) + stream.finish() == "😀ok"


def test_the_deltas_add_up_to_a_decode_of_every_id(tokenizer):
    # random ids (byte pieces, word starts, specials, unknowns): decoding a window at a time loses and adds nothing
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        stream = TextStream(tokenizer)
        deltas = [stream.push(i) for i in ids]
        assert "".join(deltas) + stream.finish() == tokenizer.decode(ids) == stream.text
