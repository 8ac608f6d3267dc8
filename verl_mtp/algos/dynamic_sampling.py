"""DAPO dynamic sampling: drop groups whose responses all score alike, and keep generating
until ``data.train_batch_size`` informative groups are collected.

The driver loops::

    state = DynamicSamplingState()
    while True:
        batch = generate_and_score()
        keep = filter_groups(batch.uid, batch.metric)
        step = accumulate_groups(state, batch.uid, keep, train_batch_size, max_num_gen_batches)
        collected.append(batch[step.take]); state = step.state
        if not step.need_more: break
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .advantages import GroupIndex, index_groups


def filter_groups(group_index: GroupIndex, metric_values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(B,) bool: keep every member of a group whose metric is not identical across the group.

    Such a group has zero advantage for every member, so it only dilutes the batch. Compares
    max with min rather than std > 0: a float std of identical values need not be exactly 0.
    Groups of one are kept (as in verl), so ``rollout.n=1`` still trains.
    """
    ids, num_groups = index_groups(group_index)
    values = torch.as_tensor(metric_values, dtype=torch.float64).flatten()
    if values.numel() != ids.numel():
        raise ValueError(f"group_index has {ids.numel()} entries but metric_values has {values.numel()}")
    high = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, ids, values, "amax")
    low = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, ids, values, "amin")
    size = torch.bincount(ids, minlength=num_groups)
    return ((high != low) | (size == 1))[ids]


class FilterGroupsExhausted(RuntimeError):
    """Dynamic sampling gave up (algorithm.filter_groups.max_num_gen_batches): an outcome of the data and
    the policy that the run's command reports in one line, not a crash."""


@dataclass(frozen=True)
class DynamicSamplingState:
    """What one training step has collected so far; start each step from the default."""

    num_groups: int = 0  # informative groups kept so far
    num_gen_batches: int = 0  # generation batches consumed so far


class AccumulateResult(NamedTuple):
    take: torch.Tensor  # (B,) bool: sequences of this generation batch to add to the training batch
    state: DynamicSamplingState
    need_more: bool  # fewer than train_batch_size groups collected: generate another batch


def accumulate_groups(
    state: DynamicSamplingState,
    group_index: GroupIndex,  # (B,) prompt id of each sequence in this generation batch
    keep: Sequence[bool] | torch.Tensor,  # (B,) from filter_groups
    train_batch_size: int,  # groups (prompts) per training step
    max_num_gen_batches: int,  # <= 0: unlimited
) -> AccumulateResult:
    """Add this batch's kept groups, in batch order, up to ``train_batch_size`` groups in total.

    Groups past the target are dropped whole, so the training batch has exactly
    ``train_batch_size`` complete groups. Raises once ``max_num_gen_batches`` batches did not
    suffice, since the data is then nearly all solved or all failed.
    """
    ids, _ = index_groups(group_index)
    keep = torch.as_tensor(keep, dtype=torch.bool).flatten()
    room = max(train_batch_size - state.num_groups, 0)
    taken_groups = ids[keep].unique()[:room]  # dense ids follow first appearance: batch order
    take = keep & torch.isin(ids, taken_groups)
    new_state = DynamicSamplingState(state.num_groups + taken_groups.numel(), state.num_gen_batches + 1)
    need_more = new_state.num_groups < train_batch_size
    if need_more and 0 < max_num_gen_batches <= new_state.num_gen_batches:
        raise FilterGroupsExhausted(
            f"dynamic sampling kept {new_state.num_groups}/{train_batch_size} groups with non-identical "
            f"rewards after {new_state.num_gen_batches} generation batches, the limit "
            f"algorithm.filter_groups.max_num_gen_batches={max_num_gen_batches}; the data is too easy or "
            "too hard for the policy: raise the limit, set it to 0 (unlimited) or change the data"
        )
    return AccumulateResult(take, new_state, need_more)
