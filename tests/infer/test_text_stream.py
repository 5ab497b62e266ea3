"""Incremental detokenisation: incomplete UTF-8 and stop-string prefixes are held back."""

from palmkit.infer.text_stream import TextStream


def test_text_stream_holds_incomplete_utf8_and_stop_prefixes(tokenizer):
    ids = tokenizer.encode("素早い END more")
    stream = TextStream(tokenizer, stop=["END"])
    shown = "".join(stream.push(i) for i in ids) + stream.finish()
    assert shown == "素早い " and stream.stopped
    stream = TextStream(tokenizer)
    deltas = [stream.push(i) for i in tokenizer.encode("😀ok")]
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) + stream.finish() == "😀ok"
