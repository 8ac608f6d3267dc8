"""Graders, data-source dispatch and loading reward functions by reference."""

import pytest

from verl_mtp.data.rl_dataset import DataError
from verl_mtp.rewards.scorers import (
    check_data_sources,
    default_compute_score,
    gsm8k,
    lenient_compute_score,
    load_custom_reward_function,
    math_dapo,
    math_dapo_lenient,
    math_reward,
    resolve_scorer,
)
from verl_mtp.rewards.scorers import boxed

FILLER = "Let me think about this step by step. " * 12  # > 300 characters

# (response, ground truth, verl's acc, verl's pred). The expected values are what verl's own
# verl/utils/reward_score/math_dapo.py returns (run on these inputs outside this repository).
VERL_MATH_DAPO = [
    ("Answer: The final answer is $42$.", "42", True, "42"),
    ("Answer: 42 \\text{ cm}^2", "42", True, "42"),
    ("Answer: $$42$$", "42", False, ""),
    ("Answer: \uff14\uff12", "42", False, "\uff14\uff12"),  # full-width digits
    ("Answer: 42.0", "42", False, "42.0"),
    ("Answer: 42.", "42", False, "42."),
    ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", False, "\\dfrac{1}{2}"),
    ("Answer: 50\\%", "50", False, "50\\%"),
    ("Answer: +3", "3", False, "+3"),
    ("Answer: 007", "7", False, "007"),
    ("Answer: \\boxed{x=5}", "5", False, "5}"),
    ("Answer: 1,2", "12", True, "12"),
    ("Answer: 1,000", "1000", True, "1000"),
    ("17 + 25 = 42\nAnswer: 42", "42", True, "42"),
    ("answer: 42", "42", True, "42"),  # case-insensitive
    ("Answer:\n42", "42", True, "42"),  # the pattern's \s* crosses the line break
    ("Answer: 41\nwait, no.\nAnswer: 42", "42", True, "42"),  # the last one counts
    ("Answer: $\\boxed{42}$", "42", True, "42"),
    ("Answer: 90^\\circ", "90", True, "90"),
    ("Answer: 10 dollars", "\\$10", True, "10"),
    ("Answer: x = \\frac12", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: 3\\sqrt2", "3\\sqrt{2}", True, "3\\sqrt{2}"),
    ("Answer: \\text{(A)}", "A", False, "(A)"),
    ("I am not sure.", "42", False, "[INVALID]"),
]


@pytest.mark.parametrize("response, truth, acc, pred", VERL_MATH_DAPO)
def test_math_dapo_gives_verls_result(response, truth, acc, pred):
    assert math_dapo.compute_score(response, truth) == {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("x = \\frac{a}{b}", "\\frac{a}{b}"),
        ("\\text{an apple}", "apple"),  # "an " goes before spaces do, as in verl
        ("5 \\text{ meters}", "5"),
        ("acme", "ae"),  # units are removed as plain substrings
        ("\\overline{12}", "12"),
        ("\\sqrt3 + \\frac 1 2", "\\sqrt{3}+\\frac{1}{2}"),
        ("$1,234$ and $5$", "1234"),
    ],
)
def test_math_dapo_normalize_final_answer_matches_verl(answer, normalized):
    assert math_dapo.normalize_final_answer(answer) == normalized


def test_math_dapo_non_string_and_list_ground_truths():
    assert math_dapo.compute_score("Answer: -7", -7)["acc"] is True
    assert math_dapo.compute_score("Answer: 8", ["7", "8"]) == {"score": 1.0, "acc": True, "pred": "8"}
    assert math_dapo.compute_score("Answer: 9", ["7", "8"])["acc"] is False


def test_math_dapo_reads_only_the_tail():
    assert math_dapo.compute_score("Answer: 42\n" + FILLER, "42")["acc"] is False
    assert math_dapo.compute_score(FILLER + "\nAnswer: 42", "42")["acc"] is True


def test_math_dapo_strict_box_compares_verbatim():
    assert math_dapo.compute_score("so \\boxed{42}", "42", strict_box_verify=True) == {
        "score": 1.0, "acc": True, "pred": "42"}
    assert math_dapo.compute_score("so \\boxed{42.0}", "42", strict_box_verify=True)["acc"] is False
    assert math_dapo.compute_score("Answer: 42", "42", strict_box_verify=True)["pred"] is None
    # only the last 100 characters count
    assert math_dapo.compute_score("\\boxed{42}" + "x" * 100, "42", strict_box_verify=True)["acc"] is False
    # pause tokens: from 100 characters before the last of four positions to the end
    response = "y" * 50 + "\\boxed{42}" + "x" * 200
    assert math_dapo.compute_score(response, "42", strict_box_verify=True)["acc"] is False
    assert math_dapo.compute_score(response, "42", strict_box_verify=True, pause_tokens_index=[0, 0, 0, 140]) == {
        "score": 1.0, "acc": True, "pred": "42"}


def test_math_dapo_boxed_helpers():
    assert math_dapo.last_boxed_only_string("\\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\boxed{\\frac{1}{2}}"
    assert math_dapo.last_boxed_only_string("\\boxed{unclosed") is None
    assert math_dapo.remove_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    with pytest.raises(ValueError, match="not a"):
        math_dapo.remove_boxed("42")
    assert math_dapo.is_correct_minerva("Answer: 7", "so \\boxed{7}", gt_need_extract=True) == (True, "7")
    assert math_dapo.is_correct_minerva("#### 7", "7", answer_pattern=r"#### (.+)") == (True, "7")


@pytest.mark.parametrize(
    "response, truth, correct, pred",
    [
        ("17 + 25 = 42\nAnswer: 42", "42", True, "42"),
        ("I am not sure.", "42", False, math_dapo_lenient.NO_ANSWER),
        ("Answer: 42.", "42", True, "42"),
        ("Answer: 42.0", "42", True, "42"),
        ("Answer: +3", "3", True, "3"),
        ("Answer: 50\\%", "50", True, "50"),
        ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", True, "\\frac{1}{2}"),
        ("Answer: 1,2", "12", False, "1,2"),  # a pair, not twelve
        ("Answer: 8", ["7", "8"], True, "8"),
    ],
)
def test_math_dapo_lenient_compares_values(response, truth, correct, pred):
    assert math_dapo_lenient.compute_score(response, truth) == {
        "score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


def test_math_dapo_lenient_takes_a_custom_extractor():
    def after_hashes(text):
        return text.rpartition("####")[2] or None

    assert math_dapo_lenient.compute_score("work\n#### 1,234", "1234", pred_extractor=after_hashes)["acc"] is True


@pytest.mark.parametrize(
    "response, method, score",
    [
        ("so 9 + 9 = 18\n#### 18", "strict", 1.0),
        ("so 9 + 9 = 18\n#### 1,8", "strict", 1.0),  # commas dropped
        ("so 9 + 9 = 18\n#### 17", "strict", 0.0),
        ("the answer is 18", "strict", 0.0),  # no #### line
        ("the answer is 18.", "flexible", 0.0),  # "18." is the last number-like run
        ("the answer is 18 .", "flexible", 1.0),  # a bare "." does not count
    ],
)
def test_gsm8k_gives_verls_result(response, method, score):
    assert gsm8k.compute_score(response, "18", method=method) == score


# (response, ground truth, verl's math_reward score), as verl's own function returns them
VERL_MATH_REWARD = [
    ("so \\boxed{\\dfrac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0),
    ("\\boxed{3/4}", "\\frac{3}{4}", 1.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{k = 7}", "7", 1.0),
    ("\\boxed{x = 42}", "42", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{\\sqrt3}", "\\sqrt{3}", 1.0),
    ("\\boxed{.5}", "0.5", 1.0),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1.0),
    ("\\boxed 42$ done", "42", 1.0),  # "\\boxed x" runs to the next $
    ("\\boxed{\\sqrt}", "\\sqrt", 1.0),  # cannot be normalised: compared verbatim
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 0.0),  # strings, not algebra
    ("\\fbox{42}", "42", 0.0),
    ("\\boxed{41}", "42", 0.0),
    ("The answer is 42.", "42", 0.0),
]


@pytest.mark.parametrize("response, truth, score", VERL_MATH_REWARD)
def test_math_reward_gives_verls_result(response, truth, score):
    assert math_reward.compute_score(response, truth) == score


def test_math_reward_list_ground_truth():
    assert math_reward.compute_score("\\boxed{8}", ["7", "8"]) == 1.0
    assert math_reward.compute_score("\\boxed{None}", None) == 0.0


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
    assert boxed.compute_score("The answer is 42.", "42") == {
        "score": -1.0, "acc": False, "pred": math_dapo_lenient.NO_ANSWER}


def test_boxed_treats_math_verify_errors_as_wrong(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(boxed, "verify", broken)
    assert boxed.compute_score("\\boxed{42}", "42")["score"] == -1.0


@pytest.mark.parametrize("source",
                         ["synthetic_math", "math_dapo", "math", "math_dapo_reasoning", "aime2024", "aime_2025"])
def test_answer_line_sources_use_math_dapo(source):
    assert default_compute_score(source, "7 + 1 = 8\nAnswer: 8", "8")["acc"] is True
    assert default_compute_score(source, "\\boxed{8}", "8")["acc"] is False  # no Answer: line
    assert default_compute_score(source, "Answer: 8.0", "8")["acc"] is False  # verl's string comparison
    assert lenient_compute_score(source, "Answer: 8.0", "8")["acc"] is True


@pytest.mark.parametrize("source", ["lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500"])
def test_math_sources_use_verls_math_grader_or_math_verify_when_lenient(source):
    assert default_compute_score(source, "\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert default_compute_score(source, "\\boxed{(x+1)^2}", "x^2+2x+1") == 0.0
    assert lenient_compute_score(source, "\\boxed{(x+1)^2}", "x^2+2x+1")["score"] == 1.0


def test_gsm8k_source_uses_gsm8k():
    assert default_compute_score("openai/gsm8k", "#### 18", "18") == 1.0


@pytest.mark.parametrize("source, message", [
    ("my_set", "no built-in reward function for data_source='my_set'"),
    ("numina_olympiads", "data_source='numina_olympiads' needs a grader verl has"),
])
def test_unknown_data_source_is_a_one_line_error(source, message):
    with pytest.raises(ValueError, match=message) as info:
        default_compute_score(source, "Answer: 1", "1")
    assert "\n" not in str(info.value)


def test_data_sources_without_a_grader_fail_at_start_in_one_line():
    check_data_sources(["math", "aime2024", "openai/gsm8k", "math", "HuggingFaceH4/MATH-500"], "data.train_files")
    with pytest.raises(DataError, match="data.val_files: no built-in reward function for data_source='my_set'") as err:
        check_data_sources(["math", "my_set"], "data.val_files")
    assert "\n" not in str(err.value)


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


def test_verl_style_pkg_and_file_paths(reward_file):
    assert resolve_scorer(("pkg://verl_mtp.rewards.scorers", "lenient_compute_score")) is lenient_compute_score
    assert resolve_scorer(("pkg://verl_mtp/rewards/scorers", "default_compute_score")) is default_compute_score
    assert resolve_scorer((f"file://{reward_file}", "by_length"))("s", "ab", "x")["score"] == 2
