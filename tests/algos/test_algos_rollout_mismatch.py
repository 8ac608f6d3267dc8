"""The rollout-vs-trainer log-prob mismatch metrics (verl's names), hand-computed."""

import math

import torch

from verl_mtp.algos.rollout_mismatch import rollout_mismatch_metrics


def test_mismatch_metrics_hand_computed():
    rollout = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    actor = torch.log(torch.tensor([[0.4, 0.2, 0.1]]))  # the last token is padding: ignored
    m = rollout_mismatch_metrics(rollout, actor, torch.tensor([[1, 1, 0]]))
    assm = lambda k, v: math.isclose(m[k], v, rel_tol=1e-5, abs_tol=1e-6)  # noqa: E731
    assert m["training/rollout_probs_diff_valid"] == 1.0
    assert assm("training/rollout_probs_diff_max", 0.1) and assm("training/rollout_probs_diff_mean", 0.05)
    assert assm("training/rollout_probs_diff_std", math.sqrt(2) * 0.05)
    assert assm("training/rollout_actor_probs_pearson_corr", 1.0)  # two points always lie on a line
    assert assm("rollout_corr/kl", math.log(0.5 / 0.4) / 2)
    assert assm("rollout_corr/k3_kl", (0.8 - math.log(0.8) - 1) / 2)
    same = rollout_mismatch_metrics(rollout, rollout, torch.ones(1, 3))
    assert same["training/rollout_probs_diff_max"] == 0 and same["rollout_corr/kl"] == 0
    assert rollout_mismatch_metrics(rollout, actor, torch.zeros(1, 3)) == {"training/rollout_probs_diff_valid": 0.0}
