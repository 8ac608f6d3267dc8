"""Start-time checks of the RL settings verl users set: policy loss, temperature, Dr.GRPO's horizon."""

import pytest

from verl_mtp.config import ConfigError, load_config

ACTOR = "actor_rollout_ref.actor."


@pytest.mark.parametrize("mode", ["vanilla", "gspo", "clip_cov", "kl_cov",
                                  "verl_mtp.algos.policy_loss:compute_policy_loss"])
def test_known_policy_losses_and_dotted_paths_are_accepted(mode):
    assert load_config([ACTOR + f"policy_loss.loss_mode={mode}"]).actor_rollout_ref.actor.policy_loss.loss_mode == mode


@pytest.mark.parametrize(
    "override, message",
    [
        ("policy_loss.loss_mode=gpg", "expected one of vanilla|gspo|clip_cov|kl_cov or 'pkg.module:function'"),
        ("policy_loss.loss_mode=no_such_pkg_xyz:fn", "cannot load 'no_such_pkg_xyz:fn': ModuleNotFoundError"),
        ("policy_loss.loss_mode=verl_mtp.algos:nope", "cannot load 'verl_mtp.algos:nope': AttributeError"),
        ("policy_loss.loss_mode=verl_mtp.algos:LOSS_AGG_MODES", "is not callable"),
        ("policy_loss.clip_cov_ratio=0", "must be in (0, 1]"),
        ("policy_loss.kl_cov_ratio=2", "must be in (0, 1]"),
        ("loss_scale_factor=0", "must be >= 1"),
    ],
)
def test_bad_policy_loss_settings_are_one_line_naming_the_key(override, message):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config([ACTOR + override])
    assert f"key '{ACTOR}{key}'" in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("temperature", ["0", "0.0", "-1"])
def test_greedy_training_rollouts_are_refused(temperature):
    with pytest.raises(ConfigError, match="rollout.temperature': must be > 0 for training rollouts") as err:
        load_config([f"actor_rollout_ref.rollout.temperature={temperature}"])
    assert "val_kwargs.temperature=0" in str(err.value) and "\n" not in str(err.value)


def test_greedy_validation_rollouts_are_fine():
    cfg = load_config(["actor_rollout_ref.rollout.val_kwargs.temperature=0"])
    assert cfg.actor_rollout_ref.rollout.val_kwargs.temperature == 0


def test_verl_policy_loss_keys_and_defaults():
    actor = load_config([]).actor_rollout_ref.actor
    assert dict(actor.policy_loss) == {"loss_mode": "vanilla", "clip_cov_ratio": 0.0002, "clip_cov_lb": 1.0,
                                       "clip_cov_ub": 5.0, "kl_cov_ratio": 0.0002, "ppo_kl_coef": 0.1}
    assert actor.loss_scale_factor is None  # Dr.GRPO's horizon: data.max_response_length


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_non_positive_mtp_lr_scale_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError) as err:
        load_config([f"actor_rollout_ref.model.mtp.lr_scale={value}"])
    assert "key 'actor_rollout_ref.model.mtp.lr_scale': must be > 0" in str(err.value) and "\n" not in str(err.value)
