"""Reward scoring: a reward manager (naive | dapo) over a pool of grader processes."""

from __future__ import annotations

from omegaconf import OmegaConf

from verl_mtp.config import resolve_reward_kwargs
from verl_mtp.rewards import RewardSample, build_reward_manager


class RewardWorker:
    def __init__(self, cfg: dict):
        cfg = OmegaConf.create(cfg)
        rm, custom = cfg.reward_model, cfg.custom_reward_function
        scorer = (custom.path, custom.name) if custom.path else None
        self.manager = build_reward_manager(
            rm.reward_manager, compute_score_ref=scorer, num_workers=rm.num_workers, timeout_s=rm.timeout_s,
            failure_score=rm.failure_score, scorer_kwargs=OmegaConf.to_container(custom.reward_kwargs),
            **resolve_reward_kwargs(cfg))

    def score(self, samples: list[RewardSample]):
        return self.manager(samples)

    def close(self) -> None:
        self.manager.close()
