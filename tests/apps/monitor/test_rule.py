"""The alert rule: rolling statistics by hand, an alert on a shift only, one alert per episode."""

import math

import numpy as np
import pytest

from palmkit.apps.monitor.records import parse_record
from palmkit.apps.monitor.rule import Topic, format_alert, rolling_stats, update_topic
from tests.apps.monitor.conftest import RULE, record, shift_stream


def test_rolling_stats_match_a_hand_computation():
    rng = np.random.default_rng(0)
    scores = rng.random(30).round(3).tolist()
    st = rolling_stats(scores, RULE)
    window, base = np.array(scores[-4:]), np.array(scores[-16:-4])
    se = max(base.std(ddof=0) / math.sqrt(4), 0.05)
    assert st.share == pytest.approx(window.mean())
    assert st.mean == pytest.approx(base.mean()) and st.se == pytest.approx(se)
    assert st.z == pytest.approx((window.mean() - base.mean()) / se)
    # Too few texts for a window, then for a baseline; a constant baseline falls back on the floor
    assert rolling_stats(scores[:3], RULE) is None
    assert rolling_stats(scores[:11], RULE).z is None and rolling_stats(scores[:12], RULE).z is not None
    st = rolling_stats([0.0] * 10 + [1, 1, 0, 1], RULE)
    assert st.se == 0.05 and st.z == pytest.approx(0.75 / 0.05)


def test_alert_fires_on_a_shift_and_not_on_a_flat_topic():
    oil, tech, alerts = Topic(), Topic(), []
    for line in shift_stream():
        rec = parse_record(line.encode(), "x:1")
        topic = oil if rec.topic == "oil" else tech
        alert = update_topic(topic, rec.topic, float("bad" in rec.text), rec.time, RULE)
        alerts += [alert] if alert else []
    assert [a["topic"] for a in alerts] == ["oil"]
    a = alerts[0]
    # The third bad text in a row (the 23rd): window [0, 1, 1, 1] against the 12 texts before it, 2 of them bad;
    # the second bad text in a row gave z = 1.79 only
    se = math.sqrt(1 / 6 * 5 / 6) / 2
    assert a["items"] == 23 and a["share"] == 0.75 and a["baseline"] == pytest.approx(1 / 6)
    assert a["se"] == pytest.approx(se) and a["z"] == pytest.approx((0.75 - 1 / 6) / se)
    assert format_alert(a) == ("2005-01-02T20:00 ALERT oil: negative share 0.75 vs baseline 0.17 ± 0.19 "
                               "(z = 3.1, last 4 of 23 items)")
    assert tech.n == 26 and not tech.alerting and len(tech.points) == 23


def test_hysteresis_one_alert_per_episode():
    topic, fired = Topic(), []
    pattern = [0.0] * 12 + [1.0] * 8 + [0.0] * 12 + [1.0] * 4
    for i, s in enumerate(pattern):
        if update_topic(topic, "t", s, parse_record(record(i, "t", False).encode(), "x:1").time, RULE):
            fired.append(i)
    # Each episode alerts once, although z stays above the threshold for several texts in the first one. By hand:
    # text 12: window [0, 0, 0, 1], baseline all 0 -> se = floor 0.05, z = 5; z then stays >= 1 (rearm) until
    # the zeros return; text 34: window 0.75 vs a baseline with one 1 in 12 -> z = 4.8.
    assert fired == [12, 34]
    zs = [p[3] for p in topic.points if p[3] is not None]
    assert sum(z >= RULE.threshold for z in zs) > 2


def test_the_chart_shows_a_bounded_number_of_topics_the_alerting_ones_first(tmp_path):
    import struct

    from palmkit.apps.monitor.chart import MAX_PANELS, plot_topics, shown_topics
    from palmkit.apps.monitor.rule import Rule

    topics = {f"t{i:03d}": Topic(points=[["2024-01-01T00:00:00", i / 400, 0.1, None]]) for i in range(300)}
    topics["t007"].alerting = True
    alerts = [{"topic": "t005", "time": "2024-01-01T00:00:00", "share": 0.9},
              {"topic": "t006", "time": "2024-01-02T00:00:00", "share": 0.9}]
    shown = shown_topics(topics, alerts)
    # alerting now, then the alerts newest first, then the highest shares
    assert len(shown) == MAX_PANELS and {"t007", "t006", "t005"} <= set(shown)
    assert set(shown) - {"t005", "t006", "t007"} == {f"t{i:03d}" for i in range(299, 299 - MAX_PANELS + 3, -1)}
    assert shown_topics(topics, alerts, limit=2) == ["t006", "t007"]
    path = plot_topics(topics, alerts, tmp_path / "chart.png", Rule())
    _, height = struct.unpack(">II", path.read_bytes()[16:24])  # the PNG header's size
    assert height <= (1.9 * MAX_PANELS + 0.8) * 100 + 1
