"""Adaptive draft depth: pick, per decode round, the depth with the best expected tokens per second.

Expected tokens of a round at depth S are 1 + sum_{k<=S} a_k, where a_k is the running estimate of
P(draft at depth k accepted); its cost is the measured wall time of rounds at depth S for this batch
size bucket. Both are exponential moving averages, so the choice follows a moving policy (and a draft
going stale after a weight sync shows up within a few rounds). Every depth is tried a few times per
bucket before it is judged, and the runner-up is re-tried now and then so a choice can be revised.
"""

from __future__ import annotations

import math

import torch


class DepthController:
    def __init__(self, num_mtp_layers: int, max_depth: int, ema: float = 0.2, warmup_rounds: int = 2,
                 revisit_every: int = 16):
        self.max_depth = max_depth if num_mtp_layers else 0
        self.ema = ema
        self.warmup_rounds = warmup_rounds
        self.revisit_every = revisit_every
        self.accept = [0.5] * self.max_depth  # a_k, optimistic-ish prior before any measurement
        self.seconds: dict[tuple[int, int], float] = {}  # (bucket, depth) -> EMA seconds per round
        self.count: dict[tuple[int, int], int] = {}
        self.rounds = 0

    @staticmethod
    def bucket(batch_size: int) -> int:
        return 1 << max(batch_size - 1, 0).bit_length()

    def reset_acceptance(self) -> None:
        self.accept = [0.5] * self.max_depth

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
        if len(ranked) > 1 and self.rounds % self.revisit_every == 0:
            return ranked[1]
        return ranked[0]

    def observe(self, depth: int, batch_size: int, seconds: float, accepted: torch.Tensor) -> None:
        key = (self.bucket(batch_size), depth)
        old = self.seconds.get(key)
        self.seconds[key] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds
        self.count[key] = self.count.get(key, 0) + 1
        for k in range(min(depth, self.max_depth)):
            rate = float((accepted > k).float().mean())
            self.accept[k] = (1 - self.ema) * self.accept[k] + self.ema * rate
        if not math.isfinite(self.seconds[key]):
            self.seconds[key] = old or 1.0
