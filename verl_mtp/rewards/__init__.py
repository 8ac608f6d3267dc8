"""Rewards: graders, reward managers and the process pool that runs reward functions safely.

    from verl_mtp.rewards import RewardSample, build_reward_manager

    with build_reward_manager("dapo", max_resp_len=512,
                              overlong_buffer_cfg={"enable": True, "len": 128}) as manager:
        result = manager([RewardSample("...\\nAnswer: 42", 37, "synthetic_math", "42")])

Light to import (no torch): it is imported in every reward worker process.
"""

from .managers import (
    REWARD_MANAGERS,
    DAPORewardManager,
    NaiveRewardManager,
    OverlongBuffer,
    RewardResult,
    RewardSample,
    build_reward_manager,
    register_reward_manager,
)
from .pool import DEFAULT_NUM_WORKERS, FAILURE_KINDS, ScoreOutcome, ScoringPool, failure_metric
from .scorers import (
    ScorerRef,
    check_data_sources,
    default_compute_score,
    lenient_compute_score,
    load_custom_reward_function,
    resolve_scorer,
)

__all__ = [
    "DEFAULT_NUM_WORKERS",
    "FAILURE_KINDS",
    "REWARD_MANAGERS",
    "DAPORewardManager",
    "NaiveRewardManager",
    "OverlongBuffer",
    "RewardResult",
    "RewardSample",
    "ScoreOutcome",
    "ScorerRef",
    "ScoringPool",
    "build_reward_manager",
    "check_data_sources",
    "default_compute_score",
    "failure_metric",
    "lenient_compute_score",
    "load_custom_reward_function",
    "register_reward_manager",
    "resolve_scorer",
]
