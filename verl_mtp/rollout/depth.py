"""Adaptive draft depth: pick, per decode round, the depth with the best expected tokens per second.

Expected tokens of a round at depth S are 1 + sum_{k<=S} a_k, where a_k is the running estimate of
P(draft at depth k accepted); its cost is the measured wall time of rounds at depth S for this batch
size bucket. Both are exponential moving averages, so the choice follows a moving policy (and a draft
going stale after a weight sync shows up within a few rounds). Every depth up to `max_depth` (past the
K MTP layers too: the engine reuses the last layer there, as fixed depths do) is tried a few times per
bucket before it is judged, and the runner-up is re-tried now and then so a choice can be revised.

The acceptance estimates start from a prior: 0.5 per depth, or the draft's expected acceptance that
training computed for the weights just synced (`set_prior`, from mtp/expected_chain_accept_rate_{k}),
after every weight sync.

Cost estimates, and what exploring costs:
  * a round deeper than the one before it first catches lagging MTP layers up on every token they
    skipped, so its time says little about that depth's steady cost: it updates acceptance only
    (otherwise speculation, once off, would always look too slow to turn back on);
  * round times drift with context length and machine load for every depth alike, but only the
    chosen depth is measured continuously: its drift is applied to the other depths' estimates too,
    so the ranking changes on measured differences, not on the age of an estimate;
  * re-trying a deeper runner-up pays that catch-up, so the interval between re-tries doubles while
    the choice holds, and a deeper re-try runs two rounds: the second is timed, so a depth mis-costed
    during warm-up (two samples, under load) can be re-costed;
  * a deeper round does all the work of a shallower one and more, so a depth is never costed below a
    shallower one: under load, timing noise would otherwise make a useless draft look faster than plain.
Near a tie, estimation noise (a few percent) decides, and a wrong switch up also pays a catch-up, so
speculation is only chosen when it looks `margin` faster than plain decoding.
"""

from __future__ import annotations

import math

PRIOR_ROUNDS = 4  # measured rounds that training's expected acceptance is worth (see reset_acceptance)


class DepthController:
    def __init__(self, num_mtp_layers: int, max_depth: int, ema: float = 0.2, warmup_rounds: int = 2,
                 revisit_every: int = 16, max_revisit_every: int = 256, margin: float = 0.05):
        self.max_depth = max_depth if num_mtp_layers else 0
        self.prior: list[float] = []  # expected acceptance per depth of the current weights, from training
        self.ema = ema
        self.margin = margin
        self.warmup_rounds = warmup_rounds
        self.revisit_every = revisit_every
        self.max_revisit_every = max_revisit_every
        self.reset_acceptance()
        self.seconds: dict[tuple[int, int], float] = {}  # (bucket, depth) -> EMA seconds per round
        self.count: dict[tuple[int, int], int] = {}  # timed rounds per (bucket, depth)
        self.best: dict[int, int] = {}  # bucket -> depth currently chosen
        self.rounds = 0
        self.last_depth = 0  # depth of the previous round: a deeper round pays a catch-up
        self.interval = revisit_every  # rounds between re-tries of the runner-up
        self.next_revisit = revisit_every
        self.retry: int | None = None  # a deeper runner-up's second, timed round is due

    @staticmethod
    def bucket(batch_size: int) -> int:
        return 1 << max(batch_size - 1, 0).bit_length()

    def reset_acceptance(self) -> None:
        """Forget measured acceptance (new weights): back to the prior, which the first measurement replaces."""
        self.accept = extend_prior(self.prior, self.max_depth) if self.prior else [0.5] * self.max_depth
        # training's prior has no sampling noise: it weighs as much as a few measured rounds (0.5 as none)
        self.accept_seen = [PRIOR_ROUNDS if self.prior else 0] * self.max_depth

    def set_prior(self, chain_rates: list[float]) -> None:
        """P(drafts 1..k all kept) for k = 1..K as training expects it for the weights now loaded (the
        `mtp/expected_chain_accept_rate_{k}` metrics); replaces the acceptance estimates."""
        self.prior = [min(max(float(r), 0.0), 1.0) for r in chain_rates]
        self.reset_acceptance()

    def expected_tokens(self, depth: int) -> float:
        return 1.0 + sum(self.accept[:depth])

    def choose(self, batch_size: int) -> int:
        self.rounds += 1
        if self.retry is not None:
            depth, self.retry = self.retry, None
            return depth
        b = self.bucket(batch_size)
        for depth in range(self.max_depth + 1):  # measure every depth before trusting the model
            if self.count.get((b, depth), 0) < self.warmup_rounds:
                return depth
        cost = 0.0
        rates = {}
        for d in range(self.max_depth + 1):
            cost = max(cost, self.seconds[(b, d)])  # never below a shallower depth's (see the module doc)
            rates[d] = self.expected_tokens(d) / cost / (1 + self.margin if d else 1)
        ranked = sorted(rates, key=rates.get, reverse=True)
        if ranked[0] != self.best.get(b):
            self.best[b], self.interval = ranked[0], self.revisit_every
            self.next_revisit = self.rounds + self.interval
        if len(ranked) > 1 and self.rounds >= self.next_revisit:
            self.interval = min(2 * self.interval, self.max_revisit_every)
            self.next_revisit = self.rounds + self.interval
            if ranked[1] > ranked[0]:  # its first round catches the MTP layers up and is not timed
                self.retry = ranked[1]
            return ranked[1]
        return ranked[0]

    def observe(self, depth: int, batch_size: int, seconds: float, accepted: list[int]) -> None:
        """One decode round: its wall time and how many drafts each row kept."""
        b = self.bucket(batch_size)
        if depth <= self.last_depth and math.isfinite(seconds):  # no catch-up: a steady cost sample
            self._observe_cost(b, depth, seconds)
        self.last_depth = depth
        for k in range(min(depth, self.max_depth)):
            rate = sum(a > k for a in accepted) / len(accepted)
            self.accept_seen[k] += 1
            weight = max(self.ema, 1 / self.accept_seen[k])  # a plain mean (prior included) until the EMA takes over
            self.accept[k] = (1 - weight) * self.accept[k] + weight * rate

    def _observe_cost(self, b: int, depth: int, seconds: float) -> None:
        key = (b, depth)
        old = self.seconds.get(key)
        new = seconds if old is None else (1 - self.ema) * old + self.ema * seconds
        self.seconds[key] = new
        self.count[key] = self.count.get(key, 0) + 1
        if old is not None and depth == self.best.get(b):  # drift shared by all depths
            for d in range(self.max_depth + 1):
                if d != depth and (b, d) in self.seconds:
                    self.seconds[(b, d)] *= new / old


def extend_prior(chain_rates: list[float], depth: int) -> list[float]:
    """Chain acceptance for depths 1..`depth` from the first K: past K (the last MTP layer reused) each
    further draft is kept with the last layer's conditional rate a_K / a_{K-1}, optimistic for a reused
    layer, so those depths are measured rather than ruled out."""
    rates = list(chain_rates[:depth])
    if not rates:
        return [0.5] * depth
    step = rates[-1] / rates[-2] if len(rates) > 1 and rates[-2] > 0 else rates[-1]
    while len(rates) < depth:
        rates.append(rates[-1] * min(step, 1.0))
    return rates
