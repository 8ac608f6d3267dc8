"""Which pass supplies the PPO ratio's old log-probs (DAPOTrainer._old_log_prob_source)."""

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
