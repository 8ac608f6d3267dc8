import math

import pytest
import torch

from verl_mtp.algos import compute_policy_loss, get_policy_loss

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


def run(mask=None, **kwargs):
    log_prob = RATIOS.log().requires_grad_(True)
    out = compute_policy_loss(
        torch.zeros(2, 3), log_prob, ADV, torch.ones(2, 3) if mask is None else mask, 0.2, 0.28, 3.0, **kwargs
    )
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


def test_agg_mode_and_global_count_are_forwarded():
    out, _ = run(loss_agg_mode="seq-mean-token-sum")
    assert out["pg_loss"].item() == pytest.approx((sum(EXPECTED_LOSSES[:3]) + sum(EXPECTED_LOSSES[3:])) / 2)
    out, _ = run(global_token_count=12)
    assert out["pg_loss"].item() == pytest.approx(sum(EXPECTED_LOSSES) / 12)


def test_huge_log_ratio_stays_finite():
    log_prob = torch.tensor([[500.0]], requires_grad=True)
    out = get_policy_loss("vanilla")(torch.zeros(1, 1), log_prob, torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.28)
    out["pg_loss"].backward()
    assert out["pg_loss"].item() == pytest.approx(-1.28)
    assert torch.isfinite(log_prob.grad).all()


def test_dual_clip_needs_c_above_one():
    with pytest.raises(ValueError, match="clip_ratio_c"):
        compute_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.2, 1.0)
