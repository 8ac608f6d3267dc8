"""synthetic_math_chat: the task asked of a pretrained chat model, graded from the last number of its reply."""

from verl_mtp.rewards.scorers import default_compute_score


def score(reply: str, truth: str) -> tuple[float, bool, str]:
    result = default_compute_score("synthetic_math_chat", reply, truth)
    return result["score"], result["acc"], result["pred"]


def test_the_last_integer_of_the_reply_is_the_answer():
    assert score("16 - 2 = 14", "14") == (1.0, True, "14")
    assert score("So 15 - 14 is 1.", "1") == (1.0, True, "1")
    assert score("3 + 11 = 24", "14") == (-1.0, False, "24")
    assert score("I cannot say.", "14") == (-1.0, False, "")
    # a thought that mentions the right number does not count: the reply's final number does
    assert score("18 + 17 is 35, no wait, 25", "35") == (-1.0, False, "25")
