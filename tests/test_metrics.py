# Licensed under the Apache License, Version 2.0 (the "License").
"""Answer metrics (relaxed accuracy, exact match, ANLS) on cases worked out by hand."""

import pytest

import run_lora_vlm as rlv


# ---- normalize_answer / parse_number -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  Yes  ", "yes"),
        ("New\t  York\n", "new york"),
        ("Blue.", "blue"),
        ("Blue .", "blue"),
        ("3.5.", "3.5"),
        ("e.g. this", "e.g. this"),  # only a trailing period goes
        ("", ""),
        (None, ""),
        (12, "12"),
    ],
)
def test_normalize_answer(text, expected):
    assert rlv.normalize_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12", 12.0),
        ("-3.5", -3.5),
        ("+4", 4.0),
        ("1,234", 1234.0),
        ("1,234,567.5", 1234567.5),
        ("12%", 12.0),
        ("$5", 5.0),
        ("-$5", -5.0),
        (" 7.0 ", 7.0),
        (".5", 0.5),
        ("0", 0.0),
        (3, 3.0),
    ],
)
def test_parse_number_numbers(text, expected):
    value = rlv.parse_number(text)
    assert isinstance(value, float) and value == expected


@pytest.mark.parametrize("text", ["", "   ", "yes", "12 apples", "1e3", "nan", "inf", "1,23", "1.2.3", "%", "$", "-", None])
def test_parse_number_non_numbers(text):
    assert rlv.parse_number(text) is None


# ---- relaxed_match -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("12%", "12", True),  # the % is dropped
        ("12", "12%", True),
        ("12", "12.5", True),  # |12 - 12.5| = 0.5 <= 0.05 * 12.5 = 0.625 (4%)
        ("12", "13", False),  # |12 - 13| = 1 > 0.05 * 13 = 0.65 (7.7%)
        ("105", "100", True),  # exactly 5%: the bound is inclusive
        ("106", "100", False),
        ("0", "0", True),
        ("0.0", "0", True),
        ("0.01", "0", False),  # gold 0 needs exactly 0
        ("-5.2", "-5", True),  # 0.2 <= 0.05 * 5 = 0.25
        ("5", "-5", False),
        ("-5", "5", False),
        ("1234", "1,234", True),
        ("1,234", "1234", True),
        ("$5", "5", True),
        ("12.", "12", True),  # trailing period normalized away
        ("Yes", "yes", True),
        ("yes.", "Yes", True),
        ("blue", "red", False),
        ("12", "twelve", False),  # one side is not a number: plain string match
        ("", "", True),
    ],
)
def test_relaxed_match(prediction, gold, expected):
    assert rlv.relaxed_match(prediction, gold) is expected


# ---- exact_match ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("Yes", "yes", True),
        ("  New   York. ", "new york", True),
        ("12", "12", True),
        ("12", "12.0", False),  # exact match does not parse numbers
        ("12", "12.5", False),
        ("blue", "red", False),
        ("the blue", "blue", False),  # articles are kept
    ],
)
def test_exact_match(prediction, gold, expected):
    assert rlv.exact_match(prediction, gold) is expected


# ---- Levenshtein / ANLS --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, distance",
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("abc", "abc", 0), ("abc", "xyz", 3), ("flaw", "lawn", 2)],
)
def test_levenshtein_distance(a, b, distance):
    assert rlv.levenshtein_distance(a, b) == distance
    assert rlv.levenshtein_distance(b, a) == distance


def test_anls_by_hand():
    assert rlv.anls_score("kitten", "sitting") == pytest.approx(1 - 3 / 7)  # ~0.571
    assert rlv.anls_score("abc", "xyz") == 0.0  # distance 3 / 3 = 1 -> similarity 0
    assert rlv.anls_score("Paris", "paris.") == 1.0  # equal once normalized
    assert rlv.anls_score("", "") == 1.0
    assert rlv.anls_score("abc", "") == 0.0
    assert rlv.anls_score("abcd", "abce") == pytest.approx(0.75)  # 1 - 1/4
    assert rlv.anls_score("ab", "ac") == pytest.approx(0.5)  # distance exactly 0.5: kept
    assert rlv.anls_score("abc", "axy") == 0.0  # 1 - 2/3 = 0.333 < 0.5 -> 0
    assert rlv.anls_score("abc", "axy", threshold=0.3) == pytest.approx(1 / 3)
    assert rlv.anls_score("abc", "axy", threshold=0.0) == pytest.approx(1 / 3)


# ---- score_prediction ----------------------------------------------------------------------------


def test_score_prediction_single_gold():
    scores = rlv.score_prediction("12", ["12.5"])
    assert scores == {"relaxed_accuracy": 1.0, "exact_match": 0.0, "anls": pytest.approx(0.5)}  # "12" vs "12.5": 1 - 2/4
    assert all(type(v) is float for v in scores.values())


def test_score_prediction_best_over_golds():
    # gold 1 "13" fails relaxed; gold 2 "Twelve" matches neither; gold 3 "12.4" passes relaxed (0.4 <= 0.62).
    scores = rlv.score_prediction("12", ["13", "Twelve", "12.4"])
    assert scores["relaxed_accuracy"] == 1.0
    assert scores["exact_match"] == 0.0
    assert scores["anls"] == pytest.approx(0.5)  # "12" vs "13": 1 - 1/2; "12" vs "12.4": 1 - 2/4

    scores = rlv.score_prediction("kitten", ["xyz", "sitting", "Kitten."])
    assert scores == {"relaxed_accuracy": 1.0, "exact_match": 1.0, "anls": 1.0}

    scores = rlv.score_prediction("kitten", ["xyz", "sitting"])
    assert scores == {"relaxed_accuracy": 0.0, "exact_match": 0.0, "anls": pytest.approx(4 / 7)}


def test_score_prediction_edge_golds():
    assert rlv.score_prediction("yes", "Yes") == {"relaxed_accuracy": 1.0, "exact_match": 1.0, "anls": 1.0}
    assert rlv.score_prediction("yes", []) == {"relaxed_accuracy": 0.0, "exact_match": 0.0, "anls": 0.0}


# ---- aggregate_scores ----------------------------------------------------------------------------


def record(relaxed, exact, anls, **extra):
    return {"relaxed_accuracy": relaxed, "exact_match": exact, "anls": anls, **extra}


def test_aggregate_empty():
    assert rlv.aggregate_scores([]) == {}
    assert rlv.aggregate_scores([], group_key="human_or_machine") == {}


def test_aggregate_overall():
    records = [record(1.0, 1.0, 1.0), record(1.0, 0.0, 0.5), record(0.0, 0.0, 0.0), record(0.0, 0.0, 0.25)]
    result = rlv.aggregate_scores(records)
    assert result == {"relaxed_accuracy": 0.5, "exact_match": 0.25, "anls": pytest.approx(0.4375)}
    assert all(type(v) is float for v in result.values())


def test_aggregate_with_integer_groups():
    records = [
        record(1.0, 1.0, 1.0, human_or_machine=0),
        record(0.0, 0.0, 0.5, human_or_machine=0),
        record(1.0, 0.0, 0.75, human_or_machine=1),
        record(1.0, 1.0, 1.0, human_or_machine=1),
        record(1.0, 1.0, 1.0, human_or_machine=1),
    ]
    result = rlv.aggregate_scores(records, group_key="human_or_machine")
    assert result == {
        "relaxed_accuracy": pytest.approx(0.8),
        "exact_match": pytest.approx(0.6),
        "anls": pytest.approx(0.85),  # (1 + 0.5 + 0.75 + 1 + 1) / 5
        "relaxed_accuracy_0": 0.5,
        "exact_match_0": 0.5,
        "anls_0": 0.75,
        "relaxed_accuracy_1": 1.0,
        "exact_match_1": pytest.approx(2 / 3),
        "anls_1": pytest.approx(2.75 / 3),
    }
    assert all(type(v) is float for v in result.values())


def test_aggregate_with_string_groups_and_missing_key():
    records = [
        record(1.0, 0.0, 0.6, source="human"),
        record(0.0, 0.0, 0.0, source="machine"),
        record(1.0, 1.0, 1.0),  # no group value: counted overall only
    ]
    result = rlv.aggregate_scores(records, group_key="source")
    assert result["relaxed_accuracy"] == pytest.approx(2 / 3)
    assert result["relaxed_accuracy_human"] == 1.0
    assert result["relaxed_accuracy_machine"] == 0.0
    assert result["anls_human"] == pytest.approx(0.6)
    assert result["exact_match_machine"] == 0.0
    assert len(result) == 9


def test_aggregate_group_key_absent_and_scored_records():
    scored = [rlv.score_prediction("12", ["12.5"]), rlv.score_prediction("blue", ["red"])]
    assert rlv.aggregate_scores(scored, group_key="human_or_machine") == {
        "relaxed_accuracy": 0.5,
        "exact_match": 0.0,
        "anls": pytest.approx(0.25),
    }
