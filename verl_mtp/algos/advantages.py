"""Outcome advantage estimators: GRPO (and Dr.GRPO) and RLOO.

Each takes one scalar score per sequence and the id of the group (prompt) it was sampled
for, and returns ``(advantages, returns)``, both (B, T), zero outside the response. With no
critic, returns equal advantages.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from .registry import register_adv_estimator

GroupIndex = Sequence[Hashable] | torch.Tensor


def index_groups(group_index: GroupIndex) -> tuple[torch.Tensor, int]:
    """Map arbitrary hashable group ids (uids, strings, ints) to ``(ids (B,) long, num_groups)``.

    Dense ids are numbered in order of first appearance, so sorting them keeps batch order.
    """
    keys = group_index.tolist() if hasattr(group_index, "tolist") else list(group_index)
    dense: dict[Hashable, int] = {}
    ids = [dense.setdefault(key, len(dense)) for key in keys]
    return torch.tensor(ids, dtype=torch.long), len(dense)


def _group_stats(scores: torch.Tensor, group_index: GroupIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence (B,) group size, group sum and group sum of squared deviations."""
    ids, num_groups = index_groups(group_index)
    if ids.numel() != scores.numel():
        raise ValueError(f"group_index has {ids.numel()} entries but scores has {scores.numel()}")
    ids = ids.to(scores.device)
    size = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add_(0, ids, torch.ones_like(scores))
    total = torch.zeros_like(size).index_add_(0, ids, scores)
    sq_dev = torch.zeros_like(size).index_add_(0, ids, (scores - (total / size)[ids]).square())
    return size[ids], total[ids], sq_dev[ids]


def _broadcast(per_seq: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    advantages = per_seq.unsqueeze(-1) * response_mask.to(per_seq.dtype)  # (B, T)
    return advantages, advantages.clone()


@register_adv_estimator("grpo")
def compute_grpo_outcome_advantage(
    scores: torch.Tensor,  # (B,) outcome reward of each sequence
    response_mask: torch.Tensor,  # (B, T) 1 on response tokens
    group_index: GroupIndex,  # (B,) prompt id of each sequence
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: ``(score - group mean) / (group std + epsilon)``, std unbiased like ``torch.std``.

    ``norm_adv_by_std_in_grpo=False`` is Dr.GRPO: the std division favours groups that are
    nearly all right or all wrong, so it is dropped. A group of one has mean 0 and std 1,
    i.e. its raw score is its advantage (nothing to compare against).
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    size, total, sq_dev = _group_stats(scores, group_index)
    single = size == 1
    mean = torch.where(single, 0.0, total / size)
    advantage = scores - mean
    if norm_adv_by_std_in_grpo:
        std = torch.where(single, 1.0, (sq_dev / (size - 1).clamp(min=1)).sqrt())
        advantage = advantage / (std + epsilon)
    return _broadcast(advantage, response_mask)


@register_adv_estimator("rloo")
def compute_rloo_outcome_advantage(
    scores: torch.Tensor,  # (B,) outcome reward of each sequence
    response_mask: torch.Tensor,  # (B, T) 1 on response tokens
    group_index: GroupIndex,  # (B,) prompt id of each sequence
    **_grpo_options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: score minus the mean score of the *other* members of its group.

    The leave-one-out baseline is independent of the sequence itself, so the estimate stays
    unbiased. A group of one has baseline 0. ``_grpo_options`` (epsilon,
    norm_adv_by_std_in_grpo) are accepted so one call site can serve every estimator.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    size, total, _ = _group_stats(scores, group_index)
    others = (size - 1).clamp(min=1)
    baseline = torch.where(size == 1, 0.0, (total - scores) / others)
    return _broadcast(scores - baseline, response_mask)
