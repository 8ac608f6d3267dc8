"""Which pass supplies the PPO ratio's old log-probs (DAPOTrainer._old_log_prob_source)."""

import math
from types import SimpleNamespace

import pytest

from verl_mtp.config import load_config
from verl_mtp.trainer.ray_trainer import DAPOTrainer


def source(*overrides, batch_rows=64, mini_rows=64, kl_in_reward=False):
    cfg = load_config(list(overrides))
    driver = SimpleNamespace(cfg=cfg, kl_ctrl=object() if kl_in_reward else None)
    return DAPOTrainer._old_log_prob_source(driver, batch_rows, mini_rows)


def test_single_on_policy_step_takes_the_log_probs_of_the_update_itself():
    assert source() == "update"


@pytest.mark.parametrize("kwargs,overrides", [
    ({"mini_rows": 16}, ()),  # 4 optimizer steps: later mini-batches are off-policy
    ({}, ("actor_rollout_ref.actor.ppo_epochs=2",)),
    ({"kl_in_reward": True}, ()),  # the in-reward KL needs them before the update
])
def test_off_policy_updates_recompute(kwargs, overrides):
    assert source(*overrides, **kwargs) == "recompute"


def test_bypass_mode_uses_the_rollout_log_probs():
    assert source("algorithm.rollout_correction.bypass_mode=true", mini_rows=16) == "rollout"


@pytest.mark.parametrize("extra,recomputed", [
    (("algorithm.rollout_correction.bypass_mode=true",), False),  # the rollout's own log-probs
    ((), False),  # one on-policy optimizer step: the update's own log-probs
    (("actor_rollout_ref.actor.ppo_epochs=2",), True),
])
def test_each_source_runs_end_to_end(ray_local, tmp_path, extra, recomputed):
    from tests.trainer.conftest import overrides

    cfg = load_config(overrides(tmp_path, "trainer.total_training_steps=2", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                                *extra))
    trainer = DAPOTrainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.shutdown()
    assert len(history) == 2 and all(math.isfinite(h["actor/pg_loss"]) for h in history)
    assert all((h["timing_s/old_log_prob"] > 0) == recomputed for h in history)
