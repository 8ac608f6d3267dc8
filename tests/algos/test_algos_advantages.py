import math

import numpy as np
import pytest
import torch

from verl_mtp.algos import (
    compute_grpo_outcome_advantage,
    compute_rloo_outcome_advantage,
    get_adv_estimator,
    index_groups,
)

# Two groups of three, interleaved: a = [1, 2, 3], b = [0, 0, 3].
SCORES = torch.tensor([1.0, 0.0, 2.0, 0.0, 3.0, 3.0])
GROUPS = ["a", "b", "a", "b", "a", "b"]
MASK = torch.tensor([[1, 1, 0]] * 3 + [[1, 0, 0]] * 3)


def per_sequence(advantages):
    return advantages[:, 0]


def test_index_groups_numbers_in_order_of_first_appearance():
    ids, n = index_groups(["x", "y", "x", 7])
    assert ids.tolist() == [0, 1, 0, 2] and n == 3


def test_grpo_two_groups_of_three():
    eps = 1e-6
    # a: mean 2, unbiased std 1; b: mean 1, unbiased std sqrt((1 + 1 + 4) / 2) = sqrt(3).
    s3 = math.sqrt(3)
    expected = torch.tensor([-1 / (1 + eps), -1 / (s3 + eps), 0.0, -1 / (s3 + eps), 1 / (1 + eps), 2 / (s3 + eps)])
    advantages, returns = compute_grpo_outcome_advantage(SCORES, MASK, GROUPS, epsilon=eps)
    torch.testing.assert_close(per_sequence(advantages), expected)
    torch.testing.assert_close(returns, advantages)
    # Broadcast over the response, zero on padding.
    torch.testing.assert_close(advantages[0], torch.tensor([expected[0], expected[0], 0.0]))
    assert (advantages[3:, 1:] == 0).all()


def test_dr_grpo_does_not_divide_by_std():
    advantages, _ = compute_grpo_outcome_advantage(SCORES, MASK, GROUPS, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(per_sequence(advantages), torch.tensor([-1.0, -1.0, 0.0, -1.0, 1.0, 2.0]))


def test_grpo_singleton_group_uses_mean_0_std_1():
    advantages, _ = compute_grpo_outcome_advantage(torch.tensor([5.0]), torch.ones(1, 2), ["solo"], epsilon=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[5.0, 5.0]]))


@pytest.mark.parametrize("groups", [np.array(GROUPS), torch.tensor([0, 1, 0, 1, 0, 1])])
def test_grpo_accepts_numpy_and_tensor_group_ids(groups):
    expected, _ = compute_grpo_outcome_advantage(SCORES, MASK, GROUPS)
    torch.testing.assert_close(compute_grpo_outcome_advantage(SCORES, MASK, groups)[0], expected)


def test_grpo_rejects_length_mismatch():
    with pytest.raises(ValueError, match="group_index"):
        compute_grpo_outcome_advantage(SCORES, MASK, GROUPS[:5])


def test_rloo_leave_one_out_baseline():
    # a: baselines (2+3)/2, (1+3)/2, (1+2)/2 = 2.5, 2, 1.5; b: 1.5, 1.5, 0.
    advantages, _ = compute_rloo_outcome_advantage(SCORES, MASK, GROUPS)
    torch.testing.assert_close(per_sequence(advantages), torch.tensor([-1.5, -1.5, 0.0, -1.5, 1.5, 3.0]))


def test_rloo_singleton_and_shared_call_site_options():
    rloo = get_adv_estimator("rloo")
    advantages, _ = rloo(torch.tensor([4.0]), torch.ones(1, 1), [0], epsilon=1e-6, norm_adv_by_std_in_grpo=True)
    assert advantages.item() == 4.0
