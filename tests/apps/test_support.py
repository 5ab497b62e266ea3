"""The customer-service recipe: tuning data from the FAQ, and the recipe end to end on a tiny model."""

import json
from pathlib import Path

import pytest
import torch

from palmkit.apps.support import build_sft_data, recipe
from palmkit.errors import PalmkitError
from palmkit.serve.grounding import NO_ANSWER, default_faq, load_faq
from tests.conftest import TASK_ROOT

pytestmark = pytest.mark.timeout(120)


def test_sft_data_on_the_fixture_tasks(tmp_path):
    entries = load_faq(default_faq())
    counts = build_sft_data(entries, tmp_path, dialogue=5, pseudo=5, faq_variants=4, root=TASK_ROOT)
    rows = [json.loads(line)["messages"] for line in Path(counts["path"]).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == counts["total"] == counts["faq"] + counts["pseudo_faq"] + counts["dialogue"]
    assert counts["dialogue"] == 5 and counts["pseudo_faq"] == 5
    grounded = [r for r in rows if r[0]["role"] == "system"]
    assert len(grounded) == counts["faq"] + counts["pseudo_faq"]
    covered = set()
    for system, user, reply in grounded:
        assert (user["role"], reply["role"]) == ("user", "assistant")
        first_q, first_a = system["content"].split("\n")[1:3]
        assert first_a == "A: " + reply["content"]  # the target is the answer retrieval put first
        covered.add(first_q[3:])
    assert {e.question for e in entries} <= covered  # every FAQ entry is learned at least once
    plain = [r for r in rows if r[0]["role"] != "system"]
    assert all([m["role"] for m in r] == ["user", "assistant"] for r in plain)
    assert counts["faq"] >= 3 * len(entries)


def test_recipe_end_to_end_tiny(tmp_path, checkpoint, faq_file, monkeypatch, one_thread):
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))
    torch.manual_seed(0)
    summary = recipe(checkpoint=str(checkpoint), faq=str(faq_file), out=str(tmp_path / "support"), max_train=24,
                     epochs=1, dialogue=10, pseudo=10, max_len=128)
    assert (tmp_path / "support" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "support" / "model" / "config.json").read_text())["task"] == "chat"
    assert "You: What is the capital of France?\nAssistant: " + NO_ANSWER in summary
    assert "Source: How do I reset my password? (faq.csv:2)" in summary
    assert f"palmkit serve --checkpoint {tmp_path / 'support' / 'model'} --faq {faq_file} --port 8000" in summary
    assert "You: hi, how do i reset my password?" in summary
    with pytest.raises(PalmkitError, match="not a palmkit checkpoint"):
        recipe(checkpoint=str(tmp_path), out=str(tmp_path / "x"))
