import pytest

from verl_mtp.algos import compute_grpo_outcome_advantage, compute_policy_loss, get_adv_estimator, get_policy_loss
from verl_mtp.algos.registry import register_adv_estimator


def test_builtins_are_registered_by_name():
    assert get_adv_estimator("grpo") is compute_grpo_outcome_advantage
    assert get_policy_loss("vanilla") is compute_policy_loss


def test_unknown_name_lists_known_names_on_one_line():
    with pytest.raises(ValueError) as err:
        get_adv_estimator("gae")
    message = str(err.value)
    assert "'gae'" in message and "grpo" in message and "rloo" in message and "\n" not in message
    with pytest.raises(ValueError, match="vanilla"):
        get_policy_loss("nope")


def test_dotted_path_loads_user_function():
    assert get_adv_estimator("verl_mtp.algos.advantages:compute_rloo_outcome_advantage") is get_adv_estimator("rloo")


@pytest.mark.parametrize(
    "path, reason",
    [
        ("no_such_pkg_xyz.mod:fn", "No module named"),
        ("verl_mtp.algos:missing_fn", "missing_fn"),
        ("verl_mtp.algos:LOSS_AGG_MODES", "not callable"),
    ],
)
def test_bad_dotted_path_is_a_clear_error(path, reason):
    with pytest.raises(ValueError, match=reason):
        get_policy_loss(path)


def test_registering_a_second_function_under_a_taken_name_fails():
    with pytest.raises(ValueError, match="already registered"):
        register_adv_estimator("grpo")(lambda *args, **kwargs: None)
    # Re-registering the same function (e.g. a module re-executed) is harmless.
    assert register_adv_estimator("grpo")(compute_grpo_outcome_advantage) is compute_grpo_outcome_advantage


def test_config_validation_knows_every_registered_policy_loss():
    from verl_mtp.algos.registry import _TABLES
    from verl_mtp.config.validate import POLICY_LOSSES

    assert set(POLICY_LOSSES) == set(_TABLES["policy_loss"])


def test_custom_policy_loss_by_dotted_path_gets_the_builtin_arguments(tmp_path, monkeypatch):
    (tmp_path / "my_losses_mod.py").write_text(
        "def mean_neg_adv(old_log_prob, log_prob, advantages, response_mask, config, aggregate):\n"
        "    return {'pg_loss': aggregate(-advantages * (log_prob - old_log_prob).exp(), response_mask),\n"
        "            'clip_seen': log_prob.new_tensor(config.clip_ratio_high)}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import torch

    from verl_mtp.algos import LossAggregation

    loss = get_policy_loss("my_losses_mod:mean_neg_adv")
    cfg = type("Cfg", (), {"clip_ratio_high": 0.28})()
    out = loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 3.0]]), torch.ones(1, 2), cfg,
               LossAggregation("token-mean"))
    assert out["pg_loss"].item() == -2.0 and out["clip_seen"].item() == pytest.approx(0.28)
