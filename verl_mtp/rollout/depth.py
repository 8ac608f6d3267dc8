"""Adaptive draft depth: pick, per decode round, the depth with the best expected tokens per second.

Expected tokens of a round at depth S are 1 + sum_{k<=S} a_k, where a_k is the running estimate of
P(draft at depth k accepted); its cost is the measured wall time of rounds at depth S for this batch
size bucket. Both are exponential moving averages, so the choice follows a moving policy (and a draft
going stale after a weight sync shows up within a few rounds). Every depth is tried a few times per
bucket before it is judged, and the runner-up is re-tried now and then so a choice can be revised.

A round deeper than the one before it first catches lagging MTP layers up on every token they skipped,
so its time says little about that depth's steady cost: such rounds update acceptance but not cost
(otherwise speculation, once off, would always look too slow to turn back on). Re-trying a deeper
runner-up pays that catch-up, so the interval between re-tries doubles while the choice holds.
"""

from __future__ import annotations

import math

import torch


class DepthController:
    def __init__(self, num_mtp_layers: int, max_depth: int, ema: float = 0.2, warmup_rounds: int = 2,
                 revisit_every: int = 16, max_revisit_every: int = 256):
        self.max_depth = max_depth if num_mtp_layers else 0
        self.ema = ema
        self.warmup_rounds = warmup_rounds
        self.revisit_every = revisit_every
        self.max_revisit_every = max_revisit_every
        self.reset_acceptance()
        self.seconds: dict[tuple[int, int], float] = {}  # (bucket, depth) -> EMA seconds per round
        self.count: dict[tuple[int, int], int] = {}  # timed rounds per (bucket, depth)
        self.rounds = 0
        self.last_depth = 0  # depth of the previous round: deeper rounds pay a catch-up
        self.best: int | None = None
        self.interval = revisit_every  # rounds until the runner-up is re-tried; doubles while `best` holds
        self.next_revisit = revisit_every

    @staticmethod
    def bucket(batch_size: int) -> int:
        return 1 << max(batch_size - 1, 0).bit_length()

    def reset_acceptance(self) -> None:
        self.accept = [0.5] * self.max_depth  # a_k, a prior the first measurement replaces
        self.accept_seen = [0] * self.max_depth

    def expected_tokens(self, depth: int) -> float:
        return 1.0 + sum(self.accept[:depth])

    def choose(self, batch_size: int) -> int:
        self.rounds += 1
        b = self.bucket(batch_size)
        for depth in range(self.max_depth + 1):  # measure every depth before trusting the model
            if self.count.get((b, depth), 0) < self.warmup_rounds:
                return depth
        rates = {d: self.expected_tokens(d) / self.seconds[(b, d)] for d in range(self.max_depth + 1)}
        ranked = sorted(rates, key=rates.get, reverse=True)
        if ranked[0] != self.best:
            self.best, self.interval = ranked[0], self.revisit_every
            self.next_revisit = self.rounds + self.interval
        if len(ranked) > 1 and self.rounds >= self.next_revisit:
            self.interval = min(2 * self.interval, self.max_revisit_every)
            self.next_revisit = self.rounds + self.interval
            return ranked[1]
        return ranked[0]

    def observe(self, depth: int, batch_size: int, seconds: float, accepted: torch.Tensor) -> None:
        key = (self.bucket(batch_size), depth)
        if depth <= self.last_depth:  # no catch-up in this round: a steady cost sample
            old = self.seconds.get(key)
            self.seconds[key] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds
            self.count[key] = self.count.get(key, 0) + 1
            if not math.isfinite(self.seconds[key]):
                self.seconds[key] = old or 1.0
        self.last_depth = depth
        for k in range(min(depth, self.max_depth)):
            rate = float((accepted > k).float().mean())
            self.accept_seen[k] += 1
            weight = max(self.ema, 1 / self.accept_seen[k])  # a plain mean until the EMA takes over
            self.accept[k] = (1 - weight) * self.accept[k] + weight * rate
