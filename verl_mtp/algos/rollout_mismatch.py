"""How far the rollout's behaviour log-probs are from the trainer's for the same tokens (verl's metric names).

A bf16 rollout (rollout.dtype) scored by an fp32 trainer, or a stale draft of the weights, shows here:
  training/rollout_probs_diff_{max,mean,std}  |p_rollout - p_actor| over response tokens
  training/rollout_actor_probs_pearson_corr   correlation of the two token probabilities
  rollout_corr/kl                             mean(log p_rollout - log p_actor): KL(rollout || actor),
                                              the tokens being samples of the rollout policy
  rollout_corr/k3_kl                          mean(r - log r - 1), r = p_actor / p_rollout (k3 estimator)
"""

from __future__ import annotations

import torch


def rollout_mismatch_metrics(rollout_log_probs: torch.Tensor, actor_log_probs: torch.Tensor,
                             mask: torch.Tensor) -> dict[str, float]:
    keep = mask.bool()
    rollout, actor = rollout_log_probs.detach().float()[keep], actor_log_probs.detach().float()[keep]
    if rollout.numel() == 0:
        return {"training/rollout_probs_diff_valid": 0.0}
    p_rollout, p_actor = rollout.exp(), actor.exp()
    diff = (p_rollout - p_actor).abs()
    log_ratio = actor - rollout
    corr = torch.corrcoef(torch.stack([p_rollout, p_actor]))[0, 1] if rollout.numel() > 1 else torch.tensor(1.0)
    return {"training/rollout_probs_diff_valid": 1.0,
            "training/rollout_probs_diff_max": float(diff.max()),
            "training/rollout_probs_diff_mean": float(diff.mean()),
            "training/rollout_probs_diff_std": float(diff.std()) if diff.numel() > 1 else 0.0,
            "training/rollout_actor_probs_pearson_corr": float(corr.nan_to_num(1.0)),
            "rollout_corr/kl": float(-log_ratio.mean()),
            "rollout_corr/k3_kl": float((log_ratio.exp() - log_ratio - 1).mean())}
