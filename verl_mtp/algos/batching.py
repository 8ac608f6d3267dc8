"""Order a batch's rows for the PPO epochs (``actor.shuffle``), and split a mini-batch into
micro-batches: fixed size, or by a token budget (``use_dynamic_bsz``)."""

from __future__ import annotations

import heapq
import math

import numpy as np


def epoch_orders(n: int, epochs: int, shuffle: bool, seed: int, step: int) -> list[list[int]]:
    """The row order of each PPO epoch: ``range(n)``, or with ``shuffle`` a permutation drawn from
    (seed, step, epoch), so it differs every step and epoch, and a run resumed at ``step`` replays it."""
    if not shuffle:
        return [list(range(n))] * epochs
    return [np.random.default_rng([seed, step, epoch]).permutation(n).tolist() for epoch in range(epochs)]


def split_into_micro_batches(n: int, micro_bsz: int) -> list[list[int]]:
    """Consecutive index chunks of ``micro_bsz`` (the last one may be shorter)."""
    if micro_bsz <= 0:
        raise ValueError(f"micro batch size must be > 0, got {micro_bsz}")
    return [list(range(start, min(start + micro_bsz, n))) for start in range(0, n, micro_bsz)]


def _worst_fit(order: list[int], seq_lens: list[int], num_bins: int, budget: int) -> list[list[int]] | None:
    """Each sequence (longest first) into the least-loaded bin; None if one does not fit."""
    # (load, count, bin): the count tie-break hands zero-length sequences to empty bins first,
    # so no bin stays empty; the bin index makes ties deterministic.
    heap = [(0, 0, b) for b in range(num_bins)]
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for i in order:
        load, count, b = heapq.heappop(heap)
        if load + seq_lens[i] > budget:
            return None  # the least-loaded bin has the most room, so no bin fits
        bins[b].append(i)
        heapq.heappush(heap, (load + seq_lens[i], count + 1, b))
    return bins


def partition_by_token_budget(
    seq_lens: list[int], max_token_len: int, min_num_micro_batches: int = 1
) -> list[list[int]]:
    """Indices per micro-batch, each micro-batch holding at most ``max_token_len`` tokens.

    A sequence longer than the budget gets a micro-batch of its own. The others are spread,
    longest first, over the fewest bins that worst-fit can fill (starting from the
    ``ceil(total / budget)`` lower bound), which also balances the loads. Pass the largest
    count over data-parallel ranks as ``min_num_micro_batches`` so every rank runs the same
    number of forward/backward passes (collectives must match). Deterministic: indices are
    ascending inside a micro-batch, micro-batches are ordered by decreasing token count (a
    too-large budget fails at once, not at the end of the step).
    """
    if max_token_len <= 0:
        raise ValueError(f"max_token_len must be > 0, got {max_token_len}")
    if seq_lens and min_num_micro_batches > len(seq_lens):
        raise ValueError(f"cannot make {min_num_micro_batches} non-empty micro-batches from {len(seq_lens)} sequences")
    oversized = [[i] for i, n in enumerate(seq_lens) if n > max_token_len]
    order = sorted((i for i, n in enumerate(seq_lens) if n <= max_token_len), key=lambda i: (-seq_lens[i], i))
    bins: list[list[int]] = []
    if order:
        total = sum(seq_lens[i] for i in order)
        num_bins = max(1, math.ceil(total / max_token_len), min_num_micro_batches - len(oversized))
        num_bins = min(num_bins, len(order))
        while (bins := _worst_fit(order, seq_lens, num_bins, max_token_len)) is None:
            num_bins += 1
    micro_batches = oversized + [sorted(b) for b in bins]
    return sorted(micro_batches, key=lambda mb: (-sum(seq_lens[i] for i in mb), mb[0]))
