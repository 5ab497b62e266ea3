"""Readers of the built-in tasks' package files: polarity CSVs, tweets, People's Daily, CoNLL, chats."""

from palmkit.data.tasks import load_task
from tests.conftest import TASK_ROOT
from tests.data.tasks.conftest import everything


def find(data, text):
    return [ex for ex in everything(data) if text in ex.text]


def test_polarity_csv_both_column_orders_and_bom():
    en = load_task("sentiment-en", TASK_ROOT)
    assert en.labels == ["negative", "positive"]
    (rock,) = find(en, "the rock is destined to be the 21st century's new")
    assert rock.label == "positive" and not rock.text.startswith("\ufeff") and rock.text.endswith("segal .")
    fr = load_task("sentiment-fr", TASK_ROOT)  # text first, label second in this file
    (bad,) = find(fr, "Une catastrophe.")
    assert bad.label == "negative"
    assert {ex.label for ex in everything(fr)} == {"negative", "positive"}
    assert len(everything(load_task("sentiment-de", TASK_ROOT))) == 24


def test_tweets_mixed_encodings_and_three_classes():
    data = load_task("tweets-en", TASK_ROOT)
    assert data.labels == ["negative", "neutral", "positive"]
    (tweet,) = find(data, "#driverless cars")
    assert "cars_Ñ_.no thank you" in tweet.text and tweet.label == "negative"  # a Windows-1252 line
    assert {ex.label for ex in everything(data)} == set(data.labels)


def test_peoples_daily_character_bio_merges_person_names():
    data = load_task("ner-zh", TASK_ROOT)
    assert data.labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    (s,) = [s for s in everything(data) if "".join(s.tokens) == "中共中央总书记、国家主席江泽民"]
    # 中共中央/nt 总书记/n 、/w 国家/n 主席/n 江/nr 泽民/nr: consecutive nr words are one person
    assert s.tags == ["B-ORG"] + ["I-ORG"] * 3 + ["O"] * 8 + ["B-PER", "I-PER", "I-PER"]
    assert all(len(t) == 1 for s in everything(data) for t in s.tokens)


def test_conll_english_and_japanese_characters():
    en = load_task("ner-en", TASK_ROOT)
    (s,) = [s for s in everything(en) if "Empire" in s.tokens]
    i = s.tokens.index("Empire")
    assert s.tokens[i:i + 3] == ["Empire", "State", "Building"]
    assert s.tags[i:i + 3] == ["B-facility", "I-facility", "I-facility"]
    assert len(everything(en)) == 12
    ja = load_task("ner-ja", TASK_ROOT)
    (s,) = [s for s in everything(ja) if "".join(s.tokens).startswith("2005年7月14日")]
    text = "".join(s.tokens)
    i = text.index("南アフリカ共和国")
    assert s.tags[i:i + 8] == ["B-LOC"] + ["I-LOC"] * 7  # word-level IOB2 spread over characters
    assert s.tags[:9] == ["B-DAT"] + ["I-DAT"] * 8


def test_dialogue_alternates_roles_and_drops_unanswered_chats():
    data = load_task("dialogue-en", TASK_ROOT)
    convs = everything(data)
    assert len(convs) == 8 + 3  # 8 chatterbot conversations; 3 of 6 chitchat chats got an answer
    for conv in convs:
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2) + ["user"] * (len(conv) % 2)
    replies = {c[1]["content"][:26] for c in convs if c[0]["content"] == "What is AI?"}
    assert replies == {"AI is the field of science", "Artificial Intelligence is"}
