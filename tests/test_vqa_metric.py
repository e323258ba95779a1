"""The VQA metric against the official evaluation (GT-Vision-Lab/VQA vqaEval.py, master a013f00):
hand-built cases whose expected values are what master computes, the leave-one-annotator-out
mean worked out by hand, master's normalisation quirks, and the lenient ``min3`` option."""

from __future__ import annotations

import random
from itertools import combinations

import pytest

from codis.metrics import VQA_METRICS, normalize_answer, vqa_accuracy

# (prediction, annotator answers, master's accuracy). The review of protocols-and-formats, §1b:
# its "master" column, from master run as it is.
MASTER_CASES = {
    "number word, unanimous": ("two", ["2"] * 10, 0.0),
    "digit, unanimous": ("2", ["two"] * 10, 0.0),
    "case, unanimous": ("Yes", ["yes"] * 10, 0.0),
    "trailing period, unanimous": ("yes.", ["yes"] * 10, 0.0),
    "trailing space in answers": ("yes", ["yes "] * 10, 1.0),
    "article in pred, unanimous": ("a dog", ["dog"] * 10, 0.0),
    "article in answers": ("dog", ["a dog"] * 3 + ["cat"] * 7, 0.9),
    "answers capitalised": ("yes", ["Yes"] * 4 + ["no"] * 6, 1.0),
    "contraction im": ("im", ["i'm"] * 4 + ["no"] * 6, 0.0),
    "contraction ive": ("ive", ["i've"] * 4 + ["no"] * 6, 0.0),
    "contraction shes": ("shes", ["she's"] * 4 + ["no"] * 6, 0.0),
    "contraction wholl": ("wholl", ["who'll"] * 4 + ["no"] * 6, 1.0),
    "contraction twas": ("twas", ["'twas"] * 4 + ["no"] * 6, 1.0),
    "hyphen, unanimous": ("t shirt", ["t-shirt"] * 10, 0.0),
    "double inner space, unanimous": ("t  shirt", ["t shirt"] * 10, 0.0),
    "CR before hyphen": ("a b c", ["a\r-b-c"] * 4 + ["no"] * 6, 1.0),
    "NBSP before hyphen": ("a bc", ["a\xa0-b-c"] * 4 + ["no"] * 6, 0.0),
    "more than 32 periods": ("x", ["x" + "." * 40] * 4 + ["no"] * 6, 0.0),
    "1 annotator, match": ("yes", ["yes"], 0.0),
    "3 annotators, 2 match": ("yes", ["yes", "yes", "no"], 4 / 9),
    "1 match of 10": ("red", ["red"] + ["blue"] * 9, 0.3),
    "2 matches of 10": ("red", ["red"] * 2 + ["blue"] * 8, 0.6),
    "3 matches of 10": ("red", ["red"] * 3 + ["blue"] * 7, 0.9),
    "none -> 0": ("0", ["none"] * 4 + ["1"] * 6, 1.0),
    "question mark in answers": ("yes", ["yes?"] * 4 + ["no"] * 6, 1.0),
    "unicode upper case": ("école", ["École"] * 4 + ["no"] * 6, 1.0),
}


@pytest.mark.parametrize("predicted, answers, master", MASTER_CASES.values(), ids=MASTER_CASES)
def test_official_accuracy_equals_master(predicted: str, answers: list[str], master: float) -> None:
    assert vqa_accuracy(predicted, answers) == pytest.approx(master, abs=1e-12)
    assert vqa_accuracy(predicted, answers, metric="official") == pytest.approx(master, abs=1e-12)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                               (10, 1.0)])
def test_official_accuracy_is_the_subset_average(matches: int, expected: float) -> None:
    # 10 annotators: leaving out one of the m who match leaves m - 1 of 9, any other leaves m.
    answers = ["red"] * matches + ["blue"] * (10 - matches)
    by_hand = (matches * min((matches - 1) / 3, 1) + (10 - matches) * min(matches / 3, 1)) / 10
    assert by_hand == pytest.approx(expected)
    assert vqa_accuracy("red", answers) == pytest.approx(expected)


def test_official_accuracy_on_short_lists_by_enumerating_the_subsets() -> None:
    answers = ["yes", "yes", "no", "yeah", "yes", "no", "no", "maybe", "yes"]  # 9 annotators
    for guess in ("yes", "no", "maybe", "blue"):
        subsets = list(combinations(answers, len(answers) - 1))
        expected = sum(min(s.count(guess) / 3, 1) for s in subsets) / len(subsets)
        assert vqa_accuracy(guess, answers) == pytest.approx(expected)
    assert vqa_accuracy("yes", ["yes"]) == 0.0  # nobody is left to agree
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)


def test_min3_is_the_lenient_formula_and_never_below_official() -> None:
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7, metric="min3") == 1.0
    assert vqa_accuracy("yes", ["yes"], metric="min3") == pytest.approx(1 / 3)
    assert vqa_accuracy("yes", ["yes", "yes", "no"], metric="min3") == pytest.approx(2 / 3)
    # min3 normalises every answer, unanimous or not.
    assert vqa_accuracy("two", ["2"] * 10, metric="min3") == 1.0
    assert vqa_accuracy("The Dog", ["dog", "a dog", "dogs"], metric="min3") == pytest.approx(2 / 3)
    pool = ["yes", "Yes", "yes.", "no", "two", "2", "a dog", "dog", "t-shirt", "t shirt", "dont",
            "don't", "none", "0", " red ", "red"]
    rng = random.Random(0)
    for _ in range(2000):
        answers = [rng.choice(pool) for _ in range(rng.choice([1, 2, 3, 5, 9, 10]))]
        guess = rng.choice(pool)
        assert vqa_accuracy(guess, answers, metric="min3") >= vqa_accuracy(guess, answers)


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("none", "0"), ("ten", "10"),
    ("the dog.", "dog"), ("A red car", "red car"), ("an apple", "apple"),
    ("yes!", "yes"), ("Yes ", "yes"), ("  many   spaces ", "many spaces"), ("\tyes\n", "yes"),
    ("hot-dog", "hot dog"), ("t-shirt", "t shirt"), ("left , right", "left right"),
    ("1,000", "1000"), ("3.5", "3.5"), ("e.g. 2.", "eg 2"),
    ("dont", "don't"), ("don't", "don't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("its", "its"), ("well", "well"),
    # master's table as written: lower-cased words never meet its capitalised keys, and a few
    # entries are odd but kept
    ("im", "im"), ("Im", "im"), ("ive", "ive"), ("shes", "shes"), ("somethings", "somethings"),
    ("wholl", "who'll"), ("twas", "'twas"), ("somebody'd", "somebodyd"), ("yallll", "yallll"),
    ("y'allll", "y'all'll"),
    # a space next to a mark is tested on the text as given: "\r" and NBSP are not spaces there
    ("x\r-y-z", "x y z"), ("x\xa0-y-z", "x y z"), ("x -y-z", "x yz"),
    # at most 32 periods go (master passes re.UNICODE, 32, as the count)
    ("x" + "." * 40, "x" + "." * 8), ("x" + "." * 32, "x"),
])
def test_normalize_answer_is_masters(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_bad_arguments_are_named() -> None:
    assert VQA_METRICS == ("official", "min3")
    with pytest.raises(ValueError, match="metric"):
        vqa_accuracy("yes", ["yes"], metric="vqa")
    with pytest.raises(ValueError, match="annotator_answers"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="annotator_answers"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(TypeError, match="answer"):
        vqa_accuracy(2, ["2", "3"])
