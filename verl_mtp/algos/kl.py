"""KL estimators between the policy and the reference, KL-in-reward, and KL coefficient control."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tensor_ops import masked_mean

KL_KINDS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


def kl_penalty(
    log_prob: torch.Tensor,  # (B, T) log π_θ(a|s), a sampled from π_θ
    ref_log_prob: torch.Tensor,  # (B, T) log π_ref(a|s)
    kind: str,
) -> torch.Tensor:
    """(B, T) per-token estimate of KL(π_θ ‖ π_ref) (Schulman's k1 / k2 / k3 estimators).

    - ``kl``/``k1``: log π_θ - log π_ref (unbiased, can be negative)
    - ``abs``: |k1|
    - ``mse``/``k2``: ½ (k1)² (biased, low variance)
    - ``low_var_kl``/``k3``: r - 1 - log r with r = π_ref/π_θ (unbiased, ≥ 0)
    """
    diff = log_prob - ref_log_prob
    if kind in ("kl", "k1"):
        return diff
    if kind == "abs":
        return diff.abs()
    if kind in ("mse", "k2"):
        return 0.5 * diff.square()
    if kind in ("low_var_kl", "k3"):
        log_r = (-diff).clamp(-20.0, 20.0)  # exp must stay finite
        # k3 ≥ 0; the upper clamp keeps one runaway token from dominating the loss.
        return (log_r.exp() - log_r - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL kind {kind!r}; known: {', '.join(KL_KINDS)}")


def apply_kl_in_reward(
    token_level_scores: torch.Tensor,  # (B, T) task reward, usually on the last response token
    response_mask: torch.Tensor,  # (B, T) 1 on response tokens
    old_log_prob: torch.Tensor,  # (B, T) log π_old(a|s)
    ref_log_prob: torch.Tensor,  # (B, T) log π_ref(a|s)
    kl_coef: float,
    kind: str = "kl",
) -> tuple[torch.Tensor, dict[str, float]]:
    """``algorithm.use_kl_in_reward``: token rewards = scores - kl_coef · KL per token.

    Metrics: ``actor/reward_kl_penalty`` (mean over sequences of the per-sequence mean KL;
    feed it to ``kl_ctrl.update``) and ``actor/reward_kl_penalty_coeff`` (the coefficient used).
    """
    kld = torch.where(response_mask.bool(), kl_penalty(old_log_prob, ref_log_prob, kind), 0.0)
    token_level_rewards = token_level_scores - kl_coef * kld
    current_kl = masked_mean(kld, response_mask, dim=-1).mean().item()
    return token_level_rewards, {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": kl_coef}


@dataclass
class FixedKLController:
    """A constant KL coefficient (``algorithm.kl_ctrl.type=fixed``)."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing adapts; present so callers treat both controllers alike."""


@dataclass
class AdaptiveKLController:
    """Proportional controller steering the observed KL toward ``target_kl`` (Ziegler et al. 2019).

    ``value`` is the only state; checkpoint it to resume exactly.
    """

    value: float
    target_kl: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        """``n_steps`` is the number of samples the KL was measured on (the batch size)."""
        # Error clipped to ±20 % so one noisy batch cannot swing the coefficient.
        error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def build_kl_controller(
    kl_ctrl_type: str, kl_coef: float, target_kl: float = 0.1, horizon: int = 10000
) -> FixedKLController | AdaptiveKLController:
    """The controller named by ``algorithm.kl_ctrl.type`` (``fixed`` or ``adaptive``)."""
    if kl_ctrl_type == "fixed":
        return FixedKLController(kl_coef)
    if kl_ctrl_type == "adaptive":
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"algorithm.kl_ctrl needs target_kl > 0 and horizon > 0, got {target_kl}, {horizon}")
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"unknown algorithm.kl_ctrl.type {kl_ctrl_type!r}; known: fixed, adaptive")
