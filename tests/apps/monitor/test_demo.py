"""The monitor's demo: the BBC replay builder, and the recipe on a tiny model and fake articles."""

import json
import os
import shutil

from palmkit.apps.monitor.chart import CHART_FILE
from palmkit.apps.monitor.demo import assign_topic, build_replay
from tests.conftest import TASK_ROOT


def test_replay_builder_on_bbc_like_articles(tmp_path):
    folder = tmp_path / "business"
    folder.mkdir()
    articles = {"001.txt": "Oil price hits record\n\nCrude oil rose to $55 a barrel, costing BA £40m.",
                "002.txt": "Bank cuts jobs\n\nThe lender said loans fell.",
                "003.txt": "Quiet day\n\nNothing happened at all."}
    for name, text in articles.items():
        (folder / name).write_bytes(text.encode("latin-1"))
    out = tmp_path / "stream.jsonl"
    topics = build_replay(folder, out, seed=1)
    assert topics == {"energy": 1, "banking": 1, "other": 1}
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in recs] == ["business/001", "business/002", "business/003"]
    assert "£40m" in recs[0]["text"] and recs[0]["time"] == "2005-01-03T08:00:00"
    assert recs[0]["time"] < recs[1]["time"] < recs[2]["time"]
    first = out.read_bytes()
    build_replay(folder, out, seed=1)
    assert out.read_bytes() == first  # seeded: a rebuilt replay matches the monitor's saved offsets
    assert assign_topic("Bank results\nOil oil oil.") == "energy"  # 3 = 3: a tie goes to the rule listed first
    assert assign_topic("Stocks rally\nThe economy grew.") == "markets"


def test_recipe_on_a_tiny_model_and_fake_articles(tmp_path, checkpoint, monkeypatch, capsys):
    from palmkit.apps.monitor.demo import recipe

    folder = tmp_path / "business"
    folder.mkdir()
    for i in range(12):
        text = f"Oil firm {i} reports\n\nCrude output rose. Shares in the energy firm moved {i}%."
        (folder / f"{i:03d}.txt").write_bytes(text.encode("latin-1"))
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))
    base = tmp_path / "base"
    shutil.copytree(checkpoint, base)
    options = dict(checkpoint=str(base), out=str(tmp_path / "run"), articles=str(folder), window=2,
                   baseline=4, min_baseline=2)
    first = recipe(**options)
    assert "\n12 new records (0 bad lines skipped, 0 duplicates)" in first and "energy           12 texts" in first
    assert "fine-tuned" in capsys.readouterr().out
    assert (tmp_path / "run" / "state" / CHART_FILE).is_file() and (tmp_path / "run" / "classifier.done.json").is_file()
    second = recipe(**options)  # everything cached; the monitor resumes and finds nothing new
    out = capsys.readouterr().out
    assert "(cached" in out and "settings changed" not in out
    assert "\n0 new records" in second and "in all 12 records" in second
    third = recipe(**{**options, "window": 3})  # another rule: a fresh monitor state, not an error
    assert "settings changed" in capsys.readouterr().out and "\n12 new records" in third
    os.utime(base / "model.safetensors", ns=(0, 0))  # the base pretrained again: the classifier is tuned again
    recipe(**{**options, "window": 3})
    assert "(fine-tuned" in capsys.readouterr().out
