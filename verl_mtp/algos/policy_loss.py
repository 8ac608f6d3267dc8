"""Policy losses, selected by ``actor.policy_loss.loss_mode`` as in verl: ``vanilla`` (PPO-clip with
clip-higher and dual clip), ``gspo`` (a sequence-level ratio), ``clip_cov`` and ``kl_cov`` (the
covariance-based entropy controls of "The Entropy Mechanism of RL for Reasoning LMs"), or a user's
function by dotted path ``pkg.module:function``. Every one has this signature:

    loss(old_log_prob, log_prob, advantages, response_mask, config, aggregate) -> dict[str, Tensor]

    old_log_prob   (B, T) log π_old(a|s), from the rollout policy
    log_prob       (B, T) log π_θ(a|s), carries the gradient
    advantages     (B, T)
    response_mask  (B, T) 1 on response tokens
    config         the actor config: clip_ratio_low, clip_ratio_high, clip_ratio_c and
                   policy_loss.{clip_cov_ratio, clip_cov_lb, clip_cov_ub, kl_cov_ratio, ppo_kl_coef}
    aggregate      a LossAggregation: (B, T) per-token loss -> this micro-batch's share of the loss

and returns ``pg_loss`` (scalar, the loss to *minimise*, with grad) and detached scalar metrics.
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import register_policy_loss
from .tensor_ops import LossAggregation, masked_mean, masked_sum


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, config: Any
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: the pessimistic PPO loss ``max(-A·r, -A·clip(r, 1 - low, 1 + high))``, and both terms."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high)
    return torch.maximum(unclipped, clipped), unclipped, clipped


@register_policy_loss("vanilla")
def compute_policy_loss(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    config: Any, aggregate: LossAggregation,
) -> dict[str, torch.Tensor]:
    """``-A · ratio`` clipped to ``ratio ∈ [1 - low, 1 + high]``.

    A larger ``clip_ratio_high`` (clip-higher) lets unlikely tokens with positive advantage
    grow, which keeps entropy from collapsing. For negative advantages the clipped loss is
    unbounded in the ratio, so it is also capped at ``-A · clip_ratio_c`` (dual clip).

    Metrics: ``pg_clipfrac`` (fraction of tokens where the PPO clip is active),
    ``pg_clipfrac_lower`` (where the dual clip is), ``ppo_kl`` (mean of log π_old - log π_θ).
    """
    if config.clip_ratio_c <= 1.0:
        raise ValueError(f"actor.clip_ratio_c must be > 1 for the dual clip, got {config.clip_ratio_c}")
    log_ratio = log_prob - old_log_prob
    # Clamped before exp: one token whose log-prob moved far must not overflow to inf.
    ppo_clip, unclipped, clipped = _clipped_surrogate(torch.exp(log_ratio.clamp(-20.0, 20.0)), advantages, config)
    dual_cap = -advantages * config.clip_ratio_c
    negative = advantages < 0
    pg_losses = torch.where(negative, torch.minimum(ppo_clip, dual_cap), ppo_clip)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
            "pg_clipfrac_lower": masked_mean((negative & (ppo_clip > dual_cap)).float(), response_mask),
        }
    return {"pg_loss": aggregate(pg_losses, response_mask), **metrics}


@register_policy_loss("gspo")
def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    config: Any, aggregate: LossAggregation,
) -> dict[str, torch.Tensor]:
    """GSPO: one importance ratio per sequence, the geometric mean of its token ratios,
    ``s_i = exp(mean_t(log π_θ - log π_old))``, clipped like PPO's (no dual clip).

    Every token of a sequence carries ``s_i`` as its value, while its gradient is that of its own
    log-prob (``sg[s_i] · π_θ / sg[π_θ]``), as in the paper and verl. The loss is always averaged
    per sequence then over sequences (verl forces ``seq-mean-token-mean`` here).
    """
    log_ratio = log_prob - old_log_prob
    seq_log_ratio = masked_sum(log_ratio, response_mask, dim=-1) / response_mask.sum(-1).clamp(min=1)
    # clamped above only, as in verl: a ratio far below 1 is harmless, one far above overflows
    token_log_ratio = (log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)).clamp(max=10.0)
    pg_losses, unclipped, clipped = _clipped_surrogate(torch.exp(token_log_ratio), advantages, config)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
            "pg_clipfrac_lower": torch.zeros((), device=log_prob.device),
        }
    return {"pg_loss": aggregate(pg_losses, response_mask, mode="seq-mean-token-mean"), **metrics}


def _token_covariance(advantages: torch.Tensor, log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) each token's term of cov(A, log π) over the response tokens (detached)."""
    log_prob = log_prob.detach()
    return (advantages - masked_mean(advantages, mask)) * (log_prob - masked_mean(log_prob, mask))


@register_policy_loss("clip_cov")
def compute_policy_loss_clip_cov(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    config: Any, aggregate: LossAggregation,
) -> dict[str, torch.Tensor]:
    """Clip-Cov: PPO-clip, plus the gradient of a few tokens with a large covariance between
    advantage and log-prob is cut (their loss is multiplied by 0), which slows entropy collapse.

    Candidates: response tokens the PPO clip left alone with ``clip_cov_lb < cov < clip_cov_ub``;
    ``max(1, int(clip_cov_ratio · tokens))`` of them are drawn at random (torch's global generator,
    as in verl). ``pg_clipfrac`` is the fraction of tokens cut.
    """
    options = config.policy_loss
    if options.clip_cov_ratio <= 0:
        raise ValueError(f"actor.policy_loss.clip_cov_ratio must be > 0, got {options.clip_cov_ratio}")
    log_ratio = log_prob - old_log_prob
    pg_losses, unclipped, clipped = _clipped_surrogate(torch.exp(log_ratio), advantages, config)
    mask = response_mask.bool()
    cov = _token_covariance(advantages, log_prob, response_mask)
    candidates = mask & ~(clipped > unclipped) & (cov > options.clip_cov_lb) & (cov < options.clip_cov_ub)
    positions = candidates.nonzero()  # (N, 2)
    budget = max(int(options.clip_cov_ratio * float(response_mask.sum())), 1)
    chosen = positions[torch.randperm(len(positions))[:budget].to(positions.device)]
    keep = torch.ones_like(pg_losses)
    keep[chosen[:, 0], chosen[:, 1]] = 0.0
    with torch.no_grad():
        metrics = {"pg_clipfrac": masked_mean((keep == 0).float(), response_mask),
                   "ppo_kl": masked_mean(-log_ratio, response_mask)}
    return {"pg_loss": aggregate(pg_losses * keep, response_mask), **metrics}


@register_policy_loss("kl_cov")
def compute_policy_loss_kl_cov(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    config: Any, aggregate: LossAggregation,
) -> dict[str, torch.Tensor]:
    """KL-Cov: the unclipped policy gradient ``-A · ratio``, plus ``ppo_kl_coef · |log ratio|`` on
    the ``max(1, int(kl_cov_ratio · tokens))`` response tokens with the largest covariance between
    advantage and log-prob. ``ppo_kl`` is the mean ``|log ratio|``.
    """
    options = config.policy_loss
    if options.kl_cov_ratio <= 0:
        raise ValueError(f"actor.policy_loss.kl_cov_ratio must be > 0, got {options.kl_cov_ratio}")
    log_ratio = log_prob - old_log_prob
    pg_losses = -advantages * torch.exp(log_ratio)
    mask = response_mask.bool()
    if mask.any():
        cov = _token_covariance(advantages, log_prob, response_mask)[mask]  # over response tokens only
        top = torch.topk(cov, max(1, int(cov.numel() * options.kl_cov_ratio))).indices
        penalised = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
        penalised[top] = True
        penalised = torch.zeros_like(mask).masked_scatter(mask, penalised)
        pg_losses = torch.where(penalised, pg_losses + options.ppo_kl_coef * log_ratio.abs(), pg_losses)
    with torch.no_grad():
        metrics = {"ppo_kl": masked_mean(log_ratio.abs(), response_mask)}
    return {"pg_loss": aggregate(pg_losses, response_mask), **metrics}
