"""PPO-clip policy loss with clip-higher (DAPO) and dual clip."""

from __future__ import annotations

import torch

from .registry import register_policy_loss
from .tensor_ops import agg_loss, masked_mean


@register_policy_loss("vanilla")
def compute_policy_loss(
    old_log_prob: torch.Tensor,  # (B, T) log π_old(a|s), from the rollout policy
    log_prob: torch.Tensor,  # (B, T) log π_θ(a|s), carries the gradient
    advantages: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T) 1 on response tokens
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    global_token_count: int | torch.Tensor | None = None,
    global_seq_count: int | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Loss to *minimise*: ``-A · ratio`` clipped to ``ratio ∈ [1 - low, 1 + high]``.

    A larger ``clip_ratio_high`` (clip-higher) lets unlikely tokens with positive advantage
    grow, which keeps entropy from collapsing. For negative advantages the clipped loss is
    unbounded in the ratio, so it is also capped at ``-A · clip_ratio_c`` (dual clip).

    Returns ``pg_loss`` (scalar, with grad) and detached scalar metrics: ``pg_clipfrac``
    (fraction of tokens where the PPO clip is active), ``pg_clipfrac_lower`` (fraction where
    the dual clip is active), ``ppo_kl`` (mean of log π_old - log π_θ).
    """
    if clip_ratio_c <= 1.0:
        raise ValueError(f"actor.clip_ratio_c must be > 1 for the dual clip, got {clip_ratio_c}")
    log_ratio = log_prob - old_log_prob
    # Clamped before exp: one token whose log-prob moved far must not overflow to inf.
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    ppo_clip = torch.maximum(unclipped, clipped)  # pessimistic bound
    dual_cap = -advantages * clip_ratio_c
    negative = advantages < 0
    pg_losses = torch.where(negative, torch.minimum(ppo_clip, dual_cap), ppo_clip)
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, global_token_count, global_seq_count)
    with torch.no_grad():
        return {
            "pg_loss": pg_loss,
            "pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
            "pg_clipfrac_lower": masked_mean((negative & (ppo_clip > dual_cap)).float(), response_mask),
        }
