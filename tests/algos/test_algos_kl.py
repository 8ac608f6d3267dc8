import math

import pytest
import torch

from verl_mtp.algos import AdaptiveKLController, FixedKLController, apply_kl_in_reward, build_kl_controller, kl_penalty

# log π_θ - log π_ref = [1, -1]
LOGP = torch.tensor([[0.0, -1.0]])
REF = torch.tensor([[-1.0, 0.0]])


@pytest.mark.parametrize(
    "kinds, expected",
    [
        (("kl", "k1"), [1.0, -1.0]),
        (("abs",), [1.0, 1.0]),
        (("mse", "k2"), [0.5, 0.5]),
        # r = π_ref/π_θ = [e^-1, e]; k3 = r - 1 - log r
        (("low_var_kl", "k3"), [math.exp(-1) - 1 + 1, math.e - 1 - 1]),
    ],
)
def test_kl_kinds_on_known_values(kinds, expected):
    for kind in kinds:
        torch.testing.assert_close(kl_penalty(LOGP, REF, kind), torch.tensor([expected]))


def test_k3_is_clamped_to_10():
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([15.0]), "low_var_kl").item() == 10.0
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([1000.0]), "k3").item() == 10.0


def test_unknown_kind():
    with pytest.raises(ValueError, match="low_var_kl"):
        kl_penalty(LOGP, REF, "full")


def test_apply_kl_in_reward():
    scores = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old = torch.tensor([[0.3, 0.0, 0.6], [0.5, 0.1, 9.0]])
    ref = torch.zeros(2, 3)
    rewards, metrics = apply_kl_in_reward(scores, mask, old, ref, kl_coef=0.5, kind="kl")
    torch.testing.assert_close(rewards, torch.tensor([[-0.15, 0.0, 0.7], [-0.25, 1.95, 0.0]]))
    # per-sequence mean KL: 0.3 and 0.3 -> 0.3
    assert metrics == {"actor/reward_kl_penalty": pytest.approx(0.3), "actor/reward_kl_penalty_coeff": 0.5}


def test_fixed_controller_never_changes():
    ctrl = build_kl_controller("fixed", kl_coef=0.01)
    ctrl.update(current_kl=5.0, n_steps=100)
    assert ctrl == FixedKLController(0.01)


def test_adaptive_controller_verl_semantics():
    ctrl = build_kl_controller("adaptive", kl_coef=0.1, target_kl=0.1, horizon=100)
    assert isinstance(ctrl, AdaptiveKLController)
    ctrl.update(current_kl=0.15, n_steps=10)  # error +0.5 clipped to +0.2: x(1 + 0.2·10/100)
    assert ctrl.value == pytest.approx(0.102)
    ctrl.update(current_kl=0.1, n_steps=10)  # on target: unchanged
    assert ctrl.value == pytest.approx(0.102)
    ctrl.update(current_kl=0.0, n_steps=50)  # error -1 clipped to -0.2: x(1 - 0.2·50/100)
    assert ctrl.value == pytest.approx(0.102 * 0.9)


def test_build_kl_controller_errors():
    with pytest.raises(ValueError, match="kl_ctrl.type"):
        build_kl_controller("pid", 0.1)
    with pytest.raises(ValueError, match="target_kl"):
        build_kl_controller("adaptive", 0.1, target_kl=0.0)
