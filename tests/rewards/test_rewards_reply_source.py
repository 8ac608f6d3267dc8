"""synthetic_math_chat: the task asked of a pretrained chat model, graded from the last number of its reply."""

from verl_mtp.rewards.scorers import default_compute_score


def test_the_last_number_of_the_reply_is_the_answer():
    assert default_compute_score("synthetic_math_chat", "16 - 2 = 14", "14") == 1.0
    assert default_compute_score("synthetic_math_chat", "15 - 14 is 1.", "1") == 1.0
    assert default_compute_score("synthetic_math_chat", "3 + 11 = 24", "14") == 0.0
    assert default_compute_score("synthetic_math_chat", "I cannot say.", "14") == 0.0
    # the thought that mentions the right number does not count: the reply's final number does
    assert default_compute_score("synthetic_math_chat", "18 + 17 is 35, no wait, 25", "35") == 0.0
