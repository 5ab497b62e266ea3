"""Entity spans and entity F1: conlleval's span rules and a hand computation."""

import pytest

from palmkit.finetune.scores import entity_scores, extract_entities


def test_entity_spans_follow_conlleval():
    assert extract_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert extract_entities(["O", "I-ORG", "I-ORG"]) == [("ORG", 1, 2)]  # I- without B- opens an entity
    assert extract_entities(["B-PER", "I-LOC", "B-LOC", "B-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1), ("LOC", 2, 2),
                                                                      ("LOC", 3, 3)]
    assert extract_entities(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 0), ("PER", 1, 2)]
    assert extract_entities([]) == []


def test_entity_f1_matches_a_hand_computation():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "O", "B-PER"], ["O", "B-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "O"],  # both right
            ["B-ORG", "O", "O", "B-PER"],  # ORG cut short (wrong), PER right
            ["O", "B-LOC", "B-LOC"]]  # one LOC split in two: both wrong
    s = entity_scores(gold, pred)
    # gold: PER 2, LOC 2, ORG 1; predicted: PER 2, LOC 3, ORG 1; correct: PER 2, LOC 1
    assert s["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert s["per_type"]["LOC"]["precision"] == pytest.approx(1 / 3)
    assert s["per_type"]["LOC"]["recall"] == pytest.approx(1 / 2)
    assert s["per_type"]["LOC"]["f1"] == pytest.approx(0.4)
    assert s["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert s["micro"]["precision"] == pytest.approx(3 / 6)
    assert s["micro"]["recall"] == pytest.approx(3 / 5)
    assert s["micro"]["f1"] == pytest.approx(2 * 0.5 * 0.6 / 1.1)
    assert s["macro"]["f1"] == pytest.approx((1 + 0.4 + 0) / 3)
    with pytest.raises(ValueError):
        entity_scores(gold, pred[:2])
