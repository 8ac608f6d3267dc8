import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_mtp.algos import epoch_orders, partition_by_token_budget, split_into_micro_batches


def test_split_into_micro_batches():
    assert split_into_micro_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert split_into_micro_batches(0, 2) == []
    with pytest.raises(ValueError):
        split_into_micro_batches(4, 0)


def test_partition_by_hand():
    # 12 exceeds the budget and goes alone; the rest (23 tokens) need >= 3 bins:
    # worst-fit longest first: [9], [5, 3], [5, 1] -> loads 9, 8, 6.
    assert partition_by_token_budget([9, 1, 5, 5, 12, 3], 10) == [[4], [0], [2, 5], [1, 3]]


def test_partition_balances_when_everything_fits():
    assert partition_by_token_budget([4, 4, 4, 4], 100) == [[0, 1, 2, 3]]
    assert partition_by_token_budget([4, 4, 4, 4], 8) == [[0, 2], [1, 3]]  # alternating: least-loaded bin


def test_min_num_micro_batches_for_data_parallel_ranks():
    assert partition_by_token_budget([3, 1, 2, 0], 100, min_num_micro_batches=4) == [[0], [2], [1], [3]]
    with pytest.raises(ValueError, match="non-empty"):
        partition_by_token_budget([1, 2], 100, min_num_micro_batches=3)


def test_partition_edge_cases():
    assert partition_by_token_budget([], 10) == []
    with pytest.raises(ValueError, match="max_token_len"):
        partition_by_token_budget([1], 0)


@settings(max_examples=200, deadline=None)
@given(
    seq_lens=st.lists(st.integers(min_value=0, max_value=50), max_size=40),
    budget=st.integers(min_value=1, max_value=60),
    min_bins=st.integers(min_value=1, max_value=5),
)
def test_partition_properties(seq_lens, budget, min_bins):
    min_bins = min(min_bins, max(len(seq_lens), 1))
    parts = partition_by_token_budget(seq_lens, budget, min_num_micro_batches=min_bins)
    assert sorted(i for part in parts for i in part) == list(range(len(seq_lens)))  # each index exactly once
    assert all(part == sorted(part) and part for part in parts)
    assert all(sum(seq_lens[i] for i in part) <= budget or len(part) == 1 for part in parts)
    assert parts == partition_by_token_budget(seq_lens, budget, min_num_micro_batches=min_bins)  # deterministic
    if seq_lens:
        assert len(parts) >= min_bins
    # Near-minimal: worst-fit needs more bins than the lower bound only when bins are over half full
    # or each holds a sequence longer than half the budget.
    fitting = [n for n in seq_lens if n <= budget]
    bound = max(min_bins, math.ceil(2 * sum(fitting) / budget), sum(2 * n > budget for n in fitting), 1)
    assert len(parts) - (len(seq_lens) - len(fitting)) <= bound


def test_epoch_orders_without_shuffle_keep_the_rows_in_place():
    assert epoch_orders(4, 2, shuffle=False, seed=1, step=3) == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_shuffled_orders_change_per_step_and_epoch_and_replay_on_resume():
    orders = {step: epoch_orders(32, 2, shuffle=True, seed=7, step=step) for step in range(1, 6)}
    for step, (first, second) in orders.items():
        assert sorted(first) == list(range(32)) and first != second  # epochs differ
        assert epoch_orders(32, 2, shuffle=True, seed=7, step=step) == [first, second]  # a resumed run replays it
    assert len({tuple(o[0]) for o in orders.values()}) == 5  # a new permutation every step (before: one for all)
    assert epoch_orders(32, 1, shuffle=True, seed=8, step=1) != orders[1][:1]  # and per seed
    assert epoch_orders(32, 1, shuffle=True, seed=0, step=1) != epoch_orders(32, 1, shuffle=True, seed=1, step=1)
