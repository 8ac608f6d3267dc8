"""Graders, data-source dispatch and loading reward functions by reference."""

import pytest

from verl_mtp.rewards.scorers import (
    default_compute_score,
    load_custom_reward_function,
    math_dapo,
    resolve_scorer,
)
from verl_mtp.rewards.scorers import boxed

FILLER = "Let me think about this step by step. " * 12  # > 300 characters


@pytest.mark.parametrize(
    "response, truth, correct, pred",
    [
        ("17 + 25 = 42\nAnswer: 42", "42", True, "42"),
        ("17 + 25 = 41\nAnswer: 41", "42", False, "41"),
        ("I am not sure.", "42", False, math_dapo.NO_ANSWER),
        ("Answer: $\\boxed{42}$", "42", True, "42"),
        ("Answer: 1,000", "1000", True, "1000"),
        ("Answer: 42.", "42", True, "42"),
        ("Answer: 42.0", "42", True, "42"),
        ("answer: 42", "42", True, "42"),  # case-insensitive
        ("Answer: 41\nwait, no.\nAnswer: 42", "42", True, "42"),  # the last one counts
        ("Answer: 90^\\circ", "90", True, "90"),
        ("Answer: 10 dollars", "\\$10", True, "10"),
        ("Answer: x = \\frac12", "\\frac{1}{2}", True, "\\frac{1}{2}"),
        ("Answer: 1,2", "12", False, "1,2"),  # a pair, not twelve
        ("Answer: -7", -7, True, "-7"),  # a non-string ground truth
        ("Answer: 8", ["7", "8"], True, "8"),  # any of several ground truths
    ],
)
def test_math_dapo_grades_the_answer_line(response, truth, correct, pred):
    assert math_dapo.compute_score(response, truth) == {
        "score": 1.0 if correct else -1.0,
        "acc": correct,
        "pred": pred,
    }


def test_math_dapo_reads_only_the_tail():
    assert math_dapo.compute_score("Answer: 42\n" + FILLER, "42")["acc"] is False
    assert math_dapo.compute_score(FILLER + "\nAnswer: 42", "42")["acc"] is True


def test_math_dapo_strict_box_compares_verbatim():
    assert math_dapo.compute_score("so \\boxed{42}", "42", strict_box_verify=True)["acc"] is True
    assert math_dapo.compute_score("so \\boxed{42.0}", "42", strict_box_verify=True)["acc"] is False


def test_math_dapo_takes_a_custom_extractor():
    def after_hashes(text):
        return text.rpartition("####")[2] or None

    assert math_dapo.compute_score("work\n#### 1,234", "1234", pred_extractor=after_hashes)["acc"] is True


def test_last_boxed_content_keeps_nested_braces():
    assert math_dapo.last_boxed_content("\\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert math_dapo.last_boxed_content("\\boxed{unclosed") is None


@pytest.mark.parametrize(
    "response, truth, correct",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", True),  # math_verify compares values
        ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
        ("\\boxed{41}", "42", False),
        ("\\boxed{42}", "\\boxed{42}", True),  # a boxed ground truth
        ("\\boxed{50\\%}", "50", False),  # math_verify keeps percent signs apart
    ],
)
def test_boxed_grades_with_math_verify(response, truth, correct):
    result = boxed.compute_score(response, truth)
    assert (result["score"], result["acc"]) == ((1.0, True) if correct else (-1.0, False))


def test_boxed_without_a_box_is_wrong():
    assert boxed.compute_score("The answer is 42.", "42") == {"score": -1.0, "acc": False, "pred": math_dapo.NO_ANSWER}


def test_boxed_treats_math_verify_errors_as_wrong(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(boxed, "verify", broken)
    assert boxed.compute_score("\\boxed{42}", "42")["score"] == -1.0


@pytest.mark.parametrize("source", ["synthetic_math", "math_dapo", "aime2024", "aime_2025"])
def test_answer_line_sources_use_math_dapo(source):
    assert default_compute_score(source, "7 + 1 = 8\nAnswer: 8", "8")["acc"] is True
    assert default_compute_score(source, "\\boxed{8}", "8")["acc"] is False  # no Answer: line


@pytest.mark.parametrize("source", ["lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "math"])
def test_math_sources_use_boxed(source):
    assert default_compute_score(source, "\\boxed{\\frac{1}{2}}", "0.5")["acc"] is True


def test_unknown_data_source_is_a_one_line_error():
    with pytest.raises(ValueError, match="data_source='my_set'") as info:
        default_compute_score("my_set", "Answer: 1", "1")
    assert "\n" not in str(info.value)


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class Bonus:\n"  # dataclasses need their module registered while the file runs
        "    value: float = 0.5\n"
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):\n"
        "    return float(solution_str == ground_truth) + bonus\n"
        "def by_length(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return {'score': len(solution_str), 'note': 'length'}\n"
    )
    return path


def test_load_custom_reward_function_by_path(reward_file):
    compute_score = load_custom_reward_function(str(reward_file))
    assert compute_score("any", "7", "7") == 1.0
    assert compute_score("any", "7", "7", bonus=0.5) == 1.5
    assert load_custom_reward_function(str(reward_file), "by_length")("any", "abc", "x")["score"] == 3


def test_load_custom_reward_function_errors_name_the_problem(reward_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="custom_reward_function.path"):
        load_custom_reward_function(str(tmp_path / "missing.py"))
    with pytest.raises(AttributeError, match="custom_reward_function.name='nope'"):
        load_custom_reward_function(str(reward_file), "nope")


def test_resolve_scorer_accepts_every_reference_form(reward_file):
    assert resolve_scorer(None) is default_compute_score
    assert resolve_scorer("verl_mtp.rewards.scorers:default_compute_score") is default_compute_score
    assert resolve_scorer(f"{reward_file}:by_length")("s", "ab", "x")["score"] == 2
    assert resolve_scorer((str(reward_file), "by_length"))("s", "abcd", "x")["score"] == 4
    assert resolve_scorer(str(reward_file))("s", "7", "7") == 1.0
    with pytest.raises(ValueError, match="cannot load reward function"):
        resolve_scorer("verl_mtp.rewards.scorers:no_such_function")
