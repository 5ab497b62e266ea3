"""The most-frequent-tag baseline for taggers."""

from palmkit.finetune.baselines import most_frequent_tag_baseline


def test_most_frequent_tag_baseline():
    from palmkit.data.tasks import TaggedSentence

    tagger = most_frequent_tag_baseline([TaggedSentence(["Paris", "is"], ["B-LOC", "O"]),
                                         TaggedSentence(["Paris", "Hilton"], ["B-PER", "I-PER"]),
                                         TaggedSentence(["in", "Paris"], ["O", "B-LOC"])])
    assert tagger([["Paris", "Hilton", "Rome"]]) == [["B-LOC", "I-PER", "O"]]
