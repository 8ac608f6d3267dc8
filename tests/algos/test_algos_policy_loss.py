"""Policy losses, each checked against numbers computed by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

from verl_mtp.algos import LossAggregation, compute_policy_loss, get_policy_loss

TOKEN_MEAN = LossAggregation("token-mean")


def config(**policy_loss):
    """The actor config keys the losses read (verl's names and defaults)."""
    options = {"clip_cov_ratio": 0.0002, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.0002,
               "ppo_kl_coef": 0.1, **policy_loss}
    return SimpleNamespace(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                           policy_loss=SimpleNamespace(**options))


# ---- vanilla ---------------------------------------------------------------------------------

# clip_ratio_low 0.2, clip_ratio_high 0.28, clip_ratio_c 3; old log-prob 0, so ratio = exp(log_prob).
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [0.5, 5.0, 2.0]])
ADV = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
# Per token (loss = -A·ratio unless clipped):
#   A=+1 r=1.0 -> -1            no clip
#   A=+1 r=1.5 -> -1.28         upper clip (ratio 1.28)
#   A=+1 r=0.5 -> -0.5          no clip (min(r·A, clip(r)·A) picks r)
#   A=-1 r=0.5 -> 0.8           lower clip (ratio 0.8)
#   A=-1 r=5.0 -> 3             dual clip caps -A·r = 5 at -A·c = 3
#   A=-1 r=2.0 -> 2             no clip (2 < 3)
EXPECTED_LOSSES = [-1.0, -1.28, -0.5, 0.8, 3.0, 2.0]


def run(mask=None, aggregate=TOKEN_MEAN, cfg=None):
    log_prob = RATIOS.log().requires_grad_(True)
    out = compute_policy_loss(torch.zeros(2, 3), log_prob, ADV, torch.ones(2, 3) if mask is None else mask,
                              cfg or config(), aggregate)
    return out, log_prob


def test_each_clip_branch_by_hand():
    out, log_prob = run()
    assert out["pg_loss"].item() == pytest.approx(sum(EXPECTED_LOSSES) / 6)
    assert out["pg_clipfrac"].item() == pytest.approx(2 / 6)
    assert out["pg_clipfrac_lower"].item() == pytest.approx(1 / 6)
    assert out["ppo_kl"].item() == pytest.approx(-math.log(1.0 * 1.5 * 0.5 * 0.5 * 5.0 * 2.0) / 6)
    out["pg_loss"].backward()
    # d(-A·r)/d log r = -A·r where the ratio is live; clipped and dual-capped tokens get no gradient.
    torch.testing.assert_close(log_prob.grad, torch.tensor([[-1.0, 0.0, -0.5], [0.0, 0.0, 2.0]]) / 6)


def test_metrics_are_detached_and_loss_is_not():
    out, _ = run()
    assert out["pg_loss"].requires_grad
    assert not any(out[k].requires_grad for k in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"))


def test_mask_excludes_tokens():
    out, _ = run(mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    assert out["pg_loss"].item() == pytest.approx((-1.0 - 1.28 - 0.5) / 3)
    assert out["pg_clipfrac_lower"].item() == 0.0


def test_aggregation_is_the_callers():
    out, _ = run(aggregate=LossAggregation("seq-mean-token-sum"))
    assert out["pg_loss"].item() == pytest.approx((sum(EXPECTED_LOSSES[:3]) + sum(EXPECTED_LOSSES[3:])) / 2)
    out, _ = run(aggregate=LossAggregation("token-mean", global_token_count=12))
    assert out["pg_loss"].item() == pytest.approx(sum(EXPECTED_LOSSES) / 12)
    out, _ = run(aggregate=LossAggregation("seq-mean-token-sum-norm", horizon=10))
    assert out["pg_loss"].item() == pytest.approx(sum(EXPECTED_LOSSES) / 10)


def test_huge_log_ratio_stays_finite():
    log_prob = torch.tensor([[500.0]], requires_grad=True)
    out = get_policy_loss("vanilla")(torch.zeros(1, 1), log_prob, torch.ones(1, 1), torch.ones(1, 1), config(),
                                     TOKEN_MEAN)
    out["pg_loss"].backward()
    assert out["pg_loss"].item() == pytest.approx(-1.28)
    assert torch.isfinite(log_prob.grad).all()


def test_dual_clip_needs_c_above_one():
    cfg = config()
    cfg.clip_ratio_c = 1.0
    with pytest.raises(ValueError, match="clip_ratio_c"):
        compute_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), cfg, TOKEN_MEAN)


# ---- GSPO ------------------------------------------------------------------------------------


def gspo_inputs():
    """Row 0 (A=+1): token log-ratios log 2 and 0 -> s_0 = exp((log 2 + 0) / 2) = √2, clipped to 1.28.
    Row 1 (A=-1): three log-ratios log 0.9 -> s_1 = 0.9, inside [0.8, 1.28]. Position (0, 2) is padding."""
    log_ratio = torch.tensor([[math.log(2.0), 0.0, 5.0], [math.log(0.9)] * 3])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    log_prob = (old + log_ratio).requires_grad_(True)
    return old, log_prob, torch.tensor([[1.0], [-1.0]]).expand(2, 3), torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_gspo_uses_one_clipped_ratio_per_sequence():
    old, log_prob, adv, mask = gspo_inputs()
    gspo = get_policy_loss("gspo")
    out = gspo(old, log_prob, adv, mask, config(), TOKEN_MEAN)  # GSPO always averages per sequence
    # row 0: every token -A·clip(√2) = -1.28; row 1: every token -A·0.9 = 0.9; mean of the row means
    assert out["pg_loss"].item() == pytest.approx((-1.28 + 0.9) / 2)
    assert out["pg_clipfrac"].item() == pytest.approx(2 / 5)
    assert out["pg_clipfrac_lower"].item() == 0.0
    assert out["ppo_kl"].item() == pytest.approx(-(math.log(2.0) + 3 * math.log(0.9)) / 5)
    out["pg_loss"].backward()
    # row 0 is clipped (no gradient); each token of row 1: d/dlogp_t of (1/2)(1/3)·(-A)·s_1 = 0.9 / 6
    torch.testing.assert_close(log_prob.grad, torch.tensor([[0.0, 0.0, 0.0], [0.15, 0.15, 0.15]]))


def test_gspo_differs_from_token_level_ppo():
    old, log_prob, adv, mask = gspo_inputs()
    vanilla = compute_policy_loss(old, log_prob, adv, mask, config(), LossAggregation("seq-mean-token-mean"))
    # token-level: row 0 ratios 2 (clipped to 1.28) and 1 -> mean (-1.28 - 1) / 2
    assert vanilla["pg_loss"].item() == pytest.approx(((-1.28 - 1.0) / 2 + 0.9) / 2)


# ---- Clip-Cov --------------------------------------------------------------------------------


def test_clip_cov_cuts_the_gradient_of_high_covariance_tokens():
    # Response tokens 0..3 (token 4 is padding with wild values). A = [1, 2, -1, -2] (mean 0);
    # log π = [-2, -1, -6, -7] (mean -4, centred [2, 3, -2, -3]) -> cov = A·centred = [2, 6, 2, 6].
    # In (lb=1, ub=5): tokens 0 and 2; token 0 has ratio 1.5 with A > 0, already clipped by PPO, so
    # only token 2 is cut. Budget max(1, int(0.5 · 4)) = 2 >= 1 candidate: no random choice.
    adv = torch.tensor([[1.0, 2.0, -1.0, -2.0, 100.0]])
    log_prob = torch.tensor([[-2.0, -1.0, -6.0, -7.0, 0.0]], requires_grad=True)
    old = log_prob.detach() - torch.tensor([[math.log(1.5), 0.0, 0.1, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = get_policy_loss("clip_cov")(old, log_prob, adv, mask, config(clip_cov_ratio=0.5), TOKEN_MEAN)
    # losses: token 0 clipped -1.28, token 1 -2·1, token 2 cut (0), token 3 -(-2)·1
    assert out["pg_loss"].item() == pytest.approx((-1.28 - 2.0 + 0.0 + 2.0) / 4)
    assert out["pg_clipfrac"].item() == pytest.approx(1 / 4)  # the fraction cut
    assert out["ppo_kl"].item() == pytest.approx(-(math.log(1.5) + 0.1) / 4)
    out["pg_loss"].backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([[0.0, -2.0, 0.0, 2.0, 0.0]]) / 4)


def test_clip_cov_cuts_at_most_its_budget():
    torch.manual_seed(0)
    adv = torch.tensor([[1.0, 2.0, -1.0, -2.0]])
    log_prob = torch.tensor([[-2.0, -1.0, -6.0, -7.0]])
    # both tokens 0 and 2 are candidates now (ratio 1); budget max(1, int(0.1 · 4)) = 1: one is cut
    out = get_policy_loss("clip_cov")(log_prob, log_prob, adv, torch.ones(1, 4), config(clip_cov_ratio=0.1),
                                      TOKEN_MEAN)
    assert out["pg_clipfrac"].item() == pytest.approx(1 / 4)
    assert out["pg_loss"].item() in (pytest.approx((-2.0 + 1.0 + 2.0) / 4), pytest.approx((-1.0 - 2.0 + 2.0) / 4))


# ---- KL-Cov ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio, penalised", [(0.25, [3]), (0.5, [3, 1])])
def test_kl_cov_penalises_the_top_covariance_tokens(ratio, penalised):
    # A = [1, 2, -1, -2]; log π = [-2, -1, -5, -8] (mean -4, centred [2, 3, -1, -4]) -> cov = [2, 6, 1, 8]:
    # the top max(1, int(ratio · 4)) tokens by covariance are 3, then 1. No clipping in KL-Cov.
    adv = torch.tensor([[1.0, 2.0, -1.0, -2.0, 100.0]])
    log_prob = torch.tensor([[-2.0, -1.0, -5.0, -8.0, 0.0]], requires_grad=True)
    log_ratio = [0.3, 0.1, 0.2, -0.5]
    old = log_prob.detach() - torch.tensor([log_ratio + [7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = get_policy_loss("kl_cov")(old, log_prob, adv, mask, config(kl_cov_ratio=ratio, ppo_kl_coef=0.1),
                                    TOKEN_MEAN)
    losses = [-a * math.exp(lr) for a, lr in zip([1.0, 2.0, -1.0, -2.0], log_ratio)]
    for i in penalised:
        losses[i] += 0.1 * abs(log_ratio[i])
    assert out["pg_loss"].item() == pytest.approx(sum(losses) / 4)
    assert out["ppo_kl"].item() == pytest.approx((0.3 + 0.1 + 0.2 + 0.5) / 4)
    out["pg_loss"].backward()
    grads = [-a * math.exp(lr) for a, lr in zip([1.0, 2.0, -1.0, -2.0], log_ratio)]
    for i in penalised:
        grads[i] += 0.1 * math.copysign(1.0, log_ratio[i])
    torch.testing.assert_close(log_prob.grad, torch.tensor([grads + [0.0]]) / 4)


def test_kl_cov_without_response_tokens_is_zero():
    out = get_policy_loss("kl_cov")(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2),
                                    config(), TOKEN_MEAN)
    assert out["pg_loss"].item() == 0.0


@pytest.mark.parametrize("mode, key", [("clip_cov", "clip_cov_ratio"), ("kl_cov", "kl_cov_ratio")])
def test_cov_ratios_must_be_positive(mode, key):
    with pytest.raises(ValueError, match=f"actor.policy_loss.{key}"):
        get_policy_loss(mode)(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1),
                              config(**{key: 0.0}), TOKEN_MEAN)
