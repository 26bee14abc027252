"""count_words (the paper's rule) and the repetition / effective-length rule."""

import pytest

from lwlib.text import count_words, repetition_report, truncate_words


@pytest.mark.parametrize("text,expected", [
    ("Hello world", 2),
    ("Write a 1000-word China travel guide", 6),          # digits count 0
    ("写一篇1000字的中国旅游指南", 11),                      # every ideograph counts 1, digits 0
    ("LongWriter 能写一万字。It writes 10,000+ words!", 9),  # 4 ASCII words + 5 ideographs
    ("", 0),
    ("   \n\t ", 0),
    ("1880, 1880, 1880.", 0),
    ("!!! ... ???", 0),
    ("don't stop", 3),                                     # apostrophe splits: don, t, stop
    ("e-mail state-of-the-art", 6),
    ("café naïve", 0),                                     # glued to non-ASCII word chars: no \b match
    ("中文abc中文", 4),                                     # 'abc' has no word boundary in Unicode \b
    ("ｆｕｌｌｗｉｄｔｈ", 0),                               # full-width Latin is not [a-zA-Z]
    ("《红楼梦》是一部小说", 8),
])
def test_count_words(text, expected):
    assert count_words(text) == expected


HEALTHY = (
    "The Roman Empire grew from a small city state on the Tiber into a power that ruled the Mediterranean. "
    "Its early kings gave way to a republic, whose consuls and senate balanced ambition with law. Expansion "
    "brought wealth and slaves, but also civil wars, as generals such as Marius, Sulla and Caesar turned "
    "their legions on Rome itself. Augustus ended the wars and founded the principate, a monarchy in all but "
    "name. For two centuries the pax Romana let trade flourish from Britain to Syria; roads, aqueducts and "
    "cities spread Latin and Greek culture. Crisis came in the third century: plague, inflation and dozens of "
    "short-lived emperors. Diocletian and Constantine rebuilt the state, moved its centre east and embraced "
    "Christianity. In the west, pressure from Goths, Vandals and Huns, and the loss of Africa's grain, left "
    "the last emperor deposed in 476, while the eastern empire endured for another thousand years."
)
LOOP = " ".join(["and then the cat sat on the mat again,"] * 60)


def test_healthy_text_does_not_collapse():
    r = repetition_report(HEALTHY)
    assert not r.collapsed
    assert r.effective_words == r.words == count_words(HEALTHY)
    assert r.repeated_rate < 0.05


def test_loop_collapses_after_healthy_prefix():
    text = HEALTHY + " " + LOOP
    r = repetition_report(text)
    assert r.collapsed
    assert r.words == count_words(HEALTHY) + 60 * 9
    # The collapse point falls at the start of the loop's second repetition (its first repeated 5-gram),
    # so the effective length is the healthy prefix plus one copy of the loop, give or take a few words.
    assert abs(r.effective_words - (count_words(HEALTHY) + 9)) <= 5
    assert text[r.collapse_char:].startswith("and then the cat")


def test_number_loop_collapses_although_digits_are_not_words():
    text = "The answer is: " + ", ".join(["1880"] * 300)
    r = repetition_report(text)
    assert r.collapsed and r.effective_words == 3 and r.words == 3


def test_chinese_loop():
    healthy = "长城是中国古代的军事防御工程，绵延数千公里，见证了无数王朝的兴衰。"
    r = repetition_report(healthy + "我们要好好学习天天向上。" * 50)
    assert r.collapsed
    assert count_words(healthy) <= r.effective_words <= count_words(healthy) + 12


def test_short_and_empty_text():
    assert repetition_report("").effective_words == 0
    assert not repetition_report("one two three").collapsed


def test_truncate_words():
    assert truncate_words("One, two three. Four!", 2) == "One, two"
    assert count_words(truncate_words(HEALTHY, 50)) == 50
    assert truncate_words("短文本", 10) == "短文本"
    assert truncate_words("abc", 0) == ""
