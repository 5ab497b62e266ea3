"""Monitor records: parse errors that name the line; sentences and a text's negative share."""

import pytest

from palmkit.apps.monitor.records import RecordError, negative_scores, parse_record, split_parts
from tests.apps.monitor.conftest import Stub


def test_parse_record_and_errors_name_the_line():
    rec = parse_record(b'{"time": "2005-03-14T10:00:00+01:00", "topic": " oil ", "text": "t", "id": 7}', "f:3")
    assert rec.time.isoformat() == "2005-03-14T09:00:00" and rec.topic == "oil" and rec.id == "7"
    cases = {b"\xff{}": "f:3: not valid UTF-8 (byte 0xff at column 1)",
             b'{"time": 1': "f:3: not JSON: Expecting ',' delimiter at column 11",
             b"[1]": "f:3: expected a JSON object, got list",
             b'{"time": "2005-01-01", "text": "x"}': "f:3: missing field 'topic'",
             b'{"time": "yesterday", "topic": "a", "text": "x"}': "f:3: bad time 'yesterday': expected ISO-8601 "
                                                                  "such as 2005-03-14T09:00:00Z",
             b'{"time": "2005-01-01", "topic": "a", "text": " "}': "f:3: 'text' must be a non-empty string"}
    for raw, message in cases.items():
        with pytest.raises(RecordError) as exc:
            parse_record(raw, "f:3")
        assert str(exc.value) == message


def test_sentences_and_negative_share():
    text = "Oil prices hit bad record.\nFirms said output rose 3% in 2004. Shares fell badly on Monday. Up 2%."
    assert split_parts(text) == ["Oil prices hit bad record.", "Firms said output rose 3% in 2004.",
                                 "Shares fell badly on Monday. Up 2%."]
    assert negative_scores(Stub(), [text, "all fine", "bad"]) == [pytest.approx(2 / 3), 0.0, 1.0]
    assert negative_scores(Stub(), [text], max_parts=1) == [1.0]
