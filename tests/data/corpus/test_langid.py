"""Language identification of single documents (py3langid), with its confidence."""

from __future__ import annotations

import pytest

from palmkit.data.corpus.langid import MIN_CONFIDENCE, identify, known_languages


@pytest.mark.parametrize(("text", "lang"), [
    ("Die Katze sitzt auf der Matte, und der Hund ist nicht im Haus.", "de"),
    ("The cat sat on the mat, and the dog was not in the house.", "en"),
    ("Le chat est sur le tapis et le chien n'est pas dans la maison.", "fr"),
    ("El gato está en la alfombra y el perro no está en la casa.", "es"),
    ("Кошка сидит на коврике, а собаки нет дома: она ушла гулять в парк вместе с детьми.", "ru"),
    ("猫在垫子上，狗不在家。", "zh"),
    ("猫はマットの上に座っていて、犬は家にいません。", "ja"),
    ("De kat zit op de mat en de hond is niet in huis.", "nl"),
    ("Kot siedzi na macie, a psa nie ma w domu.", "pl"),
])
def test_languages_are_identified_with_confidence(text, lang):
    code, p = identify(text)
    assert code == lang and p >= MIN_CONFIDENCE


def test_text_without_language_is_unsure():
    assert identify("1234 5678 ++ -- 42")[1] < MIN_CONFIDENCE
    assert {"en", "zh", "de", "fr", "es", "ru", "ja", "nl", "pl", "ko", "ar"} <= known_languages()
