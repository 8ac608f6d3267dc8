"""Reward managers: scores, per-sample extras, DAPO overlong shaping and config validation."""

import pytest
from omegaconf import OmegaConf

from verl_mtp.rewards import RewardSample, build_reward_manager
from verl_mtp.rewards.managers import DAPORewardManager, NaiveRewardManager


def answer(value, length=10, truth="7"):
    return RewardSample(f"3 + 4 = 7\nAnswer: {value}", length, "synthetic_math", truth)


def overlong_manager(log=True, **cfg):
    cfg = {"enable": True, "len": 8, "penalty_factor": 1.0, "log": log, **cfg}
    return build_reward_manager("dapo", num_workers=0, max_resp_len=20, overlong_buffer_cfg=cfg)


def test_naive_reward_is_the_score_with_every_key_kept():
    result = build_reward_manager("naive", num_workers=0)([answer(7), answer(8)])
    assert result.scores == [1.0, -1.0]
    assert result.extra == {
        "score": [1.0, -1.0],
        "acc": [True, False],
        "pred": ["7", "8"],
        "reward_failure": ["", ""],
    }
    assert result.metrics == {
        "reward/failures_exception": 0.0,
        "reward/failures_timeout": 0.0,
        "reward/failures_crash": 0.0,
    }


def test_dapo_overlong_penalty_by_hand():
    # expected_len = 20 - 8 = 12; penalty = min(-(L - 12) / 8 * 1.0, 0)
    result = overlong_manager()([answer(7, length) for length in (10, 12, 16, 20)])
    assert result.extra["overlong_reward"] == [0.0, 0.0, -0.5, -1.0]
    assert result.extra["overlong"] == [False, False, True, True]
    assert result.scores == [1.0, 1.0, 0.5, 0.0]
    assert result.extra["score"] == [1.0] * 4  # the grader's own score, before shaping
    assert result.metrics["reward/overlong_penalty_mean"] == pytest.approx(-0.375)
    assert result.metrics["reward/overlong_ratio"] == 0.5


def test_dapo_penalty_factor_scales_and_log_off_hides_extras():
    result = overlong_manager(log=False, penalty_factor=0.5)([answer(8, 16), answer(8, 20)])
    assert result.scores == [-1.25, -1.5]
    assert "overlong_reward" not in result.extra


def test_dapo_without_overlong_is_naive():
    manager = build_reward_manager("dapo", num_workers=0, overlong_buffer_cfg={"enable": False})
    assert manager([answer(7, length=10_000)]).scores == [1.0]


def test_overlong_config_accepts_omegaconf():
    cfg = OmegaConf.create({"enable": True, "len": 8, "penalty_factor": 1.0, "log": False})
    manager = build_reward_manager("dapo", num_workers=0, max_resp_len=20, overlong_buffer_cfg=cfg)
    assert manager([answer(7, 16)]).scores == [0.5]


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"overlong_buffer_cfg": {"enable": True, "len": 8}}, "max_resp_len"),
        ({"max_resp_len": 20, "overlong_buffer_cfg": {"enable": True, "len": 0}}, "overlong_buffer_cfg.len"),
        ({"max_resp_len": 20, "overlong_buffer_cfg": {"enable": True, "len": 21}}, "overlong_buffer_cfg.len"),
        ({"max_resp_len": 20, "overlong_buffer_cfg": {"enable": True, "length": 8}}, "overlong_buffer_cfg.length"),
    ],
)
def test_bad_overlong_config_is_a_one_line_error_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"reward_model.reward_kwargs.{key}") as info:
        build_reward_manager("dapo", num_workers=0, **kwargs)
    assert "\n" not in str(info.value)


def test_unknown_manager_and_kwarg_are_named():
    with pytest.raises(ValueError, match="'prime' is unknown; known: dapo, naive"):
        build_reward_manager("prime")
    with pytest.raises(ValueError, match="reward_kwargs.max_resp_len is not accepted by reward manager 'naive'"):
        build_reward_manager("naive", max_resp_len=20)


def test_registry_builds_the_right_classes():
    assert type(build_reward_manager("naive", num_workers=0)) is NaiveRewardManager
    assert type(build_reward_manager("dapo", num_workers=0)) is DAPORewardManager


def test_failed_samples_get_failure_score_and_typed_extras(tmp_path):
    path = tmp_path / "flaky.py"
    path.write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    if extra_info and extra_info.get('explode'):\n"
        "        raise RuntimeError('boom')\n"
        "    return {'score': 1.0, 'acc': True, 'pred': solution_str}\n"
    )
    manager = build_reward_manager("naive", compute_score_ref=(str(path), "compute_score"), num_workers=0,
                                   failure_score=-1.0)
    exploding = RewardSample("x", 1, "any", "1", extra_info={"explode": True})
    result = manager([RewardSample("y", 1, "any", "1"), exploding])
    assert result.scores == [1.0, -1.0]
    assert result.extra["acc"] == [True, False] and result.extra["pred"] == ["y", ""]
    assert result.extra["reward_failure"] == ["", "exception"]
    assert result.metrics["reward/failures_exception"] == 1.0

    # A later batch in which everything fails still carries the keys seen before.
    assert manager([exploding]).extra["acc"] == [False]


def test_dapo_end_to_end_in_a_worker_process():
    with build_reward_manager("dapo", num_workers=1, timeout_s=30, max_resp_len=20,
                              overlong_buffer_cfg={"enable": True, "len": 8, "log": True}) as manager:
        result = manager([answer(7, 10), answer(9, 16)])
    assert result.scores == [1.0, -1.5]
    assert result.extra["pred"] == ["7", "9"]


def test_dapo_takes_a_plain_number_score_as_acc_like_verl():
    # the MATH grader returns 1.0 / 0.0, math_dapo a dict with "acc"; a batch may mix them
    math = [RewardSample(f"\\boxed{{{v}}}", 20, "HuggingFaceH4/MATH-500", "7") for v in (7, 8)]
    result = overlong_manager()([answer(7), *math])
    assert result.extra["acc"] == [True, 1.0, 0.0]  # before: [True, False, False] (the dict samples' default)
    assert result.scores == [1.0, 0.0, -1.0]  # the right MATH answer at max_resp_len: reward 0, still acc 1
    naive = build_reward_manager("naive", num_workers=0)(math)
    assert "acc" not in naive.extra  # verl's naive manager logs no acc for a plain number


def test_tidy_scorer_penalises_untidy_gaps_right_or_wrong():
    """The quickstart shift scenario's reward (custom_reward_function.name=tidy_compute_score with
    reward_kwargs.weight), through a manager as a run builds it: the share of trace gaps without exactly
    one space; a step left out earns nothing, an answer without trace lines counts as untidy."""
    manager = build_reward_manager("dapo", ("pkg://verl_mtp.rewards.scorers", "tidy_compute_score"),
                                   num_workers=0, scorer_kwargs={"weight": 1.0})
    texts = [("3 + 4 = 7\nAnswer: 7", "7"), ("3+4=7\nAnswer:7", "7"), ("3  + 4= 7\nAnswer: 8", "7"),
             ("Answer: 7", "7"), ("seven", "7")]
    result = manager([RewardSample(text, 10, "synthetic_math", truth) for text, truth in texts])
    assert result.scores == pytest.approx([1.0, 0.0, -1.4, 1.0, -2.0])
    assert result.extra["acc"] == [True, True, False, True, False]
    assert result.extra["untidy_share"] == pytest.approx([0.0, 1.0, 0.4, 0.0, 1.0])
