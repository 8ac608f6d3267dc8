"""Adaptive draft depth: pick, per decode round, the depth with the best expected tokens per second.

Expected tokens of a round at depth S are 1 + sum_{k<=S} a_k, where a_k is the running estimate of
P(draft at depth k accepted); its cost is the wall time of rounds at depth S for this batch-size bucket,
measured or predicted (below). Both are exponential moving averages, so the choice follows a moving
policy (and a draft going stale after a weight sync shows up within a few rounds). Depths up to
`max_depth` are candidates (past the K MTP layers too: the engine reuses the last layer there, as fixed
depths do); the runner-up is re-tried now and then so a choice can be revised.

The acceptance estimates start from a prior: 0.5 per depth, or the draft's expected acceptance that
training computed for the weights just synced (`set_prior`, from mtp/expected_chain_accept_rate_{k}),
after every weight sync. Depths not measured yet continue the deepest measured one's rate (`acceptance`).

Costs come from a model, so a batch-size bucket measures only what could win there. Plain decoding is
measured first (it is the safe choice and the scale of every estimate); another depth's cost is plain's
times its relative cost cost(d) / cost(0), taken from this bucket's measurements, else the nearest bucket
that measured that depth, else linearly inter- or extrapolated over the depths measured; with nothing but
plain measured anywhere, depth 1 is assumed free (so it is tried once) and deeper depths wait for a slope.
The depth with the best expected rate is run; if its cost is only predicted, it is run `warmup_rounds`
timed rounds to measure it. So a bucket where drafts do not pay stays on plain after one depth-1 probe,
and a new bucket (the batch shrinking as sequences finish) starts from the neighbour's curve instead of
re-trying every depth.

What exploring costs, and how estimates are kept honest:
  * a round deeper than the one before it first catches lagging MTP layers up on every token they
    skipped, so its time says little about that depth's steady cost: it updates acceptance only
    (otherwise speculation, once off, would always look too slow to turn back on);
  * round times drift with context length and machine load for every depth alike, but only the
    chosen depth is measured continuously: its drift is applied to the other depths' estimates too,
    so the ranking changes on measured differences, not on the age of an estimate;
  * re-trying a deeper runner-up pays that catch-up (after many plain rounds, a prefill of the MTP
    layers), so only a runner-up within `revisit_within` of the best rate is re-tried, the interval
    between re-tries doubles while the choice holds (and starts at `max_revisit_every` when plain is
    best: a catch-up over a few hundred tokens costs about ten plain rounds), a re-try whose catch-up
    would cost more than `explore_budget` of the decode time since the last one waits (so exploring
    stays ~1 % of a run however long plain keeps winning), and a deeper re-try runs
    two rounds: the second is timed, so a depth mis-costed during warm-up (two samples, under load) can
    be re-costed;
  * a deeper round does all the work of a shallower one and more, so a depth is never costed below a
    shallower one: under load, timing noise would otherwise make a useless draft look faster than plain;
  * a switch up is not free: MTP layers that did not draft lag, and before drafting they run over every
    token they skipped (after a stretch of plain rounds, or for newly admitted prompts, a prefill of the
    MTP layers: 7-14 plain rounds at batch 64 on the quickstart's model). Given how far each MTP layer
    lags (`mtp_lag`, from the engine) and how much is left to generate (`horizon`, tokens per live row),
    the depth chosen is the one that finishes that work soonest, the catch-up of the layers it adds
    included (a layer that drafted last round catches up on new prompts too, but that is part of a
    depth's steady cost); the cost per caught-up token is measured from the catch-up rounds. So a
    near-tie never pays a catch-up, nor does the tail of a batch, where few rounds remain to earn it;
  * prompts admitted later (continuous batching: a few new rows in most rounds at batch 64) are caught
    up on by every MTP layer a depth uses, a cost plain decoding never pays: with the quickstart's
    prompts (~40 tokens) and answers (~30), as much MTP work as drafting itself. The engine counts the
    tokens each round caught up on; that time is taken out of the round's cost sample (so a depth's
    cost is its drafting alone, and a probe taken before any row finished is not a bargain) and the
    prompt tokens still queued are priced at the measured catch-up cost per token and layer (a switch
    up's own catch-up is priced once the depth's steady cost is measured, not predicted from plain's);
    a leader priced out by its catch-up is not re-priced for `reprice_every` rounds (the lag and the work
    left change slowly, and asking the engine for them costs ~2 % of a plain round at batch 64).
Near a tie, estimation noise (a few percent) decides, and a wrong switch up also pays a catch-up, so a
depth deeper than the one chosen is only switched to when it looks `margin` faster (10 %: on the 2-core
box, at batch 64, a switch predicted 5 % faster ran 3 % slower, the error of a two-round probe and the
catch-up price it rests on); a shallower one (plain included) as soon as it looks faster at all. The band
between keeps a near-tie from flipping back and forth, each flip up paying a catch-up, and never keeps a
depth that looks slower than a shallower one.
"""

from __future__ import annotations

import math

PRIOR_ROUNDS = 4  # measured rounds that training's expected acceptance is worth (see reset_acceptance)


class DepthController:
    def __init__(self, num_mtp_layers: int, max_depth: int, ema: float = 0.2, warmup_rounds: int = 2,
                 revisit_every: int = 16, max_revisit_every: int = 256, margin: float = 0.10,
                 revisit_within: float = 0.25, reprice_every: int = 8, explore_budget: float = 0.01):
        self.max_depth = max_depth if num_mtp_layers else 0
        self.prior: list[float] = []  # expected acceptance per depth of the current weights, from training
        self.ema = ema
        self.margin = margin
        self.revisit_within = revisit_within
        self.warmup_rounds = warmup_rounds
        self.revisit_every = revisit_every
        self.max_revisit_every = max_revisit_every
        self.reprice_every = reprice_every
        self.explore_budget = explore_budget
        self.since_retry = 0.0  # decode seconds since the last re-try: what a re-try's catch-up may spend
        self.reset_acceptance()
        self.seconds: dict[tuple[int, int], float] = {}  # (bucket, depth) -> EMA seconds per round
        self._relative: dict[int, list] = {}  # bucket -> relative_costs, until a ratio changes
        self.count: dict[tuple[int, int], int] = {}  # timed rounds per (bucket, depth)
        self.best: dict[int, int] = {}  # bucket -> depth currently chosen
        self.rounds = 0
        self.last_depth = 0  # depth of the previous round: a deeper round pays a catch-up
        self.interval = revisit_every  # rounds between re-tries of the runner-up
        self.next_revisit = revisit_every
        self.retry: int | None = None  # a deeper runner-up's second, timed round is due
        self.probe: tuple[int, int] | None = None  # (bucket, depth) being measured: run until warmup_rounds
        self.catchup_cost: float | None = None  # seconds per lagging token an MTP layer catches up (EMA)
        self.catchup_seen = 0
        self.catchup_tokens = 0  # what the round just chosen catches up on
        self._lag = None  # this round's mtp_lag (a list, or a function not yet called)
        self._switch: tuple | None = None  # (bucket, depth, seconds, tokens) of a switch up to price
        self._held: tuple | None = None  # (bucket, leader, until round): the catch-up priced that leader out
        self.num_mtp_layers = num_mtp_layers

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

    def expected_tokens(self) -> list[float]:
        """Expected tokens of a round at each depth 0..max_depth: 1 + the sum of the chain acceptances."""
        expected = [1.0]
        for a in self.acceptance():
            expected.append(expected[-1] + a)
        return expected

    def acceptance(self) -> list[float]:
        """P(drafts 1..k all kept) per depth k: the running estimates (from training's prior where given);
        depths never measured continue from the deepest measured one as `extend_prior` continues training's
        (a draft kept every time makes the next depth worth a look; 0.5 would rule deep chains out)."""
        measured = [k + 1 for k in range(self.max_depth) if self.accept_seen[k]]
        if not measured or measured[-1] == self.max_depth:
            return self.accept
        return extend_prior(self.accept[: measured[-1]], self.max_depth)

    def choose(self, batch_size: int, mtp_lag=None, horizon=None, queued_tokens: int = 0) -> int:
        """The depth of the next round for `batch_size` live rows. `mtp_lag[i]`: tokens MTP layer i is behind
        over the live rows; `horizon`: tokens per live row still to generate. Either may be a function
        returning the value, called only when a switch up is in question (on the engine, computing them
        costs more than the rest of the choice). Without them (or before a catch-up was measured) a switch
        up is costed as free. `queued_tokens`: prompt tokens still waiting for a slot, which every MTP layer
        a depth uses will catch up on when they are admitted."""
        self.rounds += 1
        self._lag = mtp_lag
        depth = self._choose(self.bucket(batch_size), horizon, queued_tokens)
        self.catchup_tokens = self._catchup(depth)
        return depth

    def _mtp_lag(self) -> list[int] | None:
        if callable(self._lag):
            self._lag = self._lag()
        return self._lag

    def _catchup(self, depth: int) -> int:
        """Tokens the layers that a round at `depth` adds to the last round's catch up on first."""
        k = self.num_mtp_layers
        if min(depth, k) <= min(self.last_depth, k) or not self._mtp_lag():
            return 0
        return sum(self._mtp_lag()[min(self.last_depth, k): min(depth, k)])

    def _choose(self, b: int, horizon, queued_tokens: int) -> int:
        if self.retry is not None:
            depth, self.retry = self.retry, None
            return depth
        if self.count.get((b, 0), 0) < self.warmup_rounds:  # plain first: the scale of every estimate
            return 0
        if self.probe is not None and self.probe[0] == b and self.count.get(self.probe, 0) < self.warmup_rounds:
            return self.probe[1]  # a probe runs until it has warmup_rounds timed samples
        costs = self.costs(b)
        expected = self.expected_tokens()
        running = self.best.get(b, 0)  # a depth deeper than this one must look `margin` better (module doc)
        rates = {d: expected[d] / c / (1 + self.margin if d > running else 1) for d, c in costs.items()}
        ranked = sorted(rates, key=rates.get, reverse=True)
        # catching up only lowers the rates of drafting depths: it can change the choice when one of those
        # leads, or a re-try when one is due and a runner-up is close
        question = ranked[0] > 0 or (self.rounds >= self.next_revisit and self._close(ranked, rates))
        if question and self.catchup_cost is not None:
            held = self._held
            if held is not None and held[:2] == (b, ranked[0]) and self.rounds < held[2]:
                # priced out a few rounds ago; the lag, the work left and the queue change slowly, and
                # asking the engine for them costs ~2 % of a plain round: keep the choice until re-priced
                return self.best[b]
            horizon = horizon() if callable(horizon) else horizon
            if horizon:
                # tokens per second over the rest of the work: the switch's catch-up, and every MTP layer the
                # depth uses running over the prompts still queued, included
                k, cost, leader = self.num_mtp_layers, self.catchup_cost, ranked[0]
                rates = {d: horizon / (horizon / r + cost * (self._catchup(d) + min(d, k) * queued_tokens))
                         for d, r in rates.items()}
                ranked = sorted(rates, key=rates.get, reverse=True)
                kept = ranked[0] == self.best.get(b) != leader
                self._held = (b, leader, self.rounds + self.reprice_every) if kept else None
        if self.count.get((b, ranked[0]), 0) < self.warmup_rounds:  # the best guess is a prediction: measure it
            self.probe = (b, ranked[0])
            return ranked[0]
        if ranked[0] != self.best.get(b):
            # from plain, a re-try prefills the MTP layers over every token since the last draft: rarely
            self.best[b] = ranked[0]
            self.interval = self.revisit_every if ranked[0] else self.max_revisit_every
            self.next_revisit = self.rounds + self.interval
        if self.rounds < self.next_revisit:
            return ranked[0]
        if not self._close(ranked, rates):
            self.next_revisit = self.rounds + self.revisit_every  # look again later (asking for the lag costs)
            return ranked[0]
        self.interval = min(2 * self.interval, self.max_revisit_every)
        self.next_revisit = self.rounds + self.interval
        if not self._affordable(ranked[1]):
            return ranked[0]
        self.since_retry = 0.0
        if ranked[1] > ranked[0]:  # its first round catches the MTP layers up and is not timed
            self.retry = ranked[1]
        return ranked[1]

    def _affordable(self, depth: int) -> bool:
        """A re-try of `depth` catches its lagging MTP layers up first (after a few hundred plain rounds at
        batch 64, ~8 plain rounds' time): it is made once that costs at most `explore_budget` of the decode
        time since the last re-try, so exploring stays a bounded share of the run."""
        if self.catchup_cost is None:
            return True
        return self.catchup_cost * self._catchup(depth) <= self.explore_budget * self.since_retry

    def _close(self, ranked: list[int], rates: dict[int, float]) -> bool:
        """The runner-up is within `revisit_within` of the best rate: worth a re-try now and then."""
        return len(ranked) > 1 and rates[ranked[1]] >= (1 - self.revisit_within) * rates[ranked[0]]

    def costs(self, b: int) -> dict[int, float]:
        """Estimated seconds per round for each depth that has an estimate in bucket `b` (module doc),
        never below a shallower depth's."""
        rel = self.relative_costs(b)
        out, floor = {}, 0.0
        for d, r in enumerate(rel):
            if r is None:
                break
            floor = max(floor, r * self.seconds[(b, 0)])
            out[d] = floor
        return out

    def relative_costs(self, b: int) -> list[float | None]:
        """cost(d) / cost(0) per depth for bucket `b`: measured here, else in the nearest bucket that has
        both, else interpolated or extrapolated linearly over the known depths (None: no estimate).
        Kept until a sample changes a ratio (the running depth's drift scales its whole bucket alike)."""
        if b not in self._relative:
            self._relative[b] = self._relative_costs(b)
        return self._relative[b]

    def _relative_costs(self, b: int) -> list[float | None]:
        rel: list[float | None] = [1.0] + [None] * self.max_depth
        nearest = sorted({k for k, _ in self.seconds}, key=lambda k: (abs(k.bit_length() - b.bit_length()), k))
        for d in range(1, self.max_depth + 1):
            for other in nearest:
                if (other, d) in self.seconds and (other, 0) in self.seconds:
                    rel[d] = self.seconds[(other, d)] / self.seconds[(other, 0)]
                    break
        known = [d for d, r in enumerate(rel) if r is not None]
        if known == [0]:
            return [1.0, 1.0] + [None] * (self.max_depth - 1)  # only plain known: try depth 1 as if free
        for d in range(1, self.max_depth + 1):
            if rel[d] is not None:
                continue
            below = [k for k in known if k < d]
            above = [k for k in known if k > d]
            lo = below[-1]
            if above:  # between two known depths
                hi = above[0]
                rel[d] = rel[lo] + (rel[hi] - rel[lo]) * (d - lo) / (hi - lo)
            else:  # past the deepest known: the last known slope, never negative
                prev = below[-2]
                rel[d] = rel[lo] + max(rel[lo] - rel[prev], 0.0) / (lo - prev) * (d - lo)
        return rel

    def observe(self, depth: int, batch_size: int, seconds: float, accepted: list[int],
                caught_up: int | None = None) -> None:
        """One decode round (the depth `choose` returned): its wall time, how many drafts each row kept, and
        the tokens its MTP layers caught up on before drafting (lagging layers after a switch up, rows just
        admitted; None: the lag `choose` was given)."""
        b = self.bucket(batch_size)
        tokens = self.catchup_tokens if caught_up is None else caught_up
        if not math.isfinite(seconds) or (tokens and self.catchup_cost is None and depth <= self.last_depth):
            pass  # a round that caught up before the catch-up cost is known: its time cannot be split
        elif depth <= self.last_depth:  # steady cost, less the rows just admitted catching up
            self._observe_cost(b, depth, max(seconds - (self.catchup_cost or 0.0) * tokens, 0.0))
            if self._switch is not None and self._switch[:2] == (b, depth):  # its steady cost is measured now
                self._observe_catchup(*self._switch[2:], self.seconds[(b, depth)])
                self._switch = None
        elif tokens > 0 and (b, 0) in self.seconds:
            # a switch up: the time past the depth's steady cost is the catch-up; a depth not measured yet is
            # priced once it is (its cost predicted from plain's would count its own extra work as catch-up)
            if (b, depth) in self.seconds:
                self._observe_catchup(seconds, tokens, self.costs(b)[depth])
            else:
                self._switch = (b, depth, seconds, tokens)
        self.last_depth = depth
        self.since_retry += seconds if math.isfinite(seconds) else 0.0
        for k in range(min(depth, self.max_depth)):
            rate = sum(a > k for a in accepted) / len(accepted)
            self.accept_seen[k] += 1  # the prior counts as PRIOR_ROUNDS samples
            self.accept[k] = self._average(self.accept[k], rate, self.accept_seen[k])

    def _observe_catchup(self, seconds: float, tokens: int, steady: float) -> None:
        self.catchup_seen += 1
        sample = max(seconds - steady, 0.0) / tokens
        self.catchup_cost = self._average(self.catchup_cost, sample, self.catchup_seen)

    def _average(self, old: float | None, sample: float, n: int) -> float:
        """The running estimate after its n-th sample: a plain mean until the EMA takes over."""
        weight = max(self.ema, 1 / n)
        return sample if old is None else (1 - weight) * old + weight * sample

    def _observe_cost(self, b: int, depth: int, seconds: float) -> None:
        key = (b, depth)
        old, n = self.seconds.get(key), self.count.get(key, 0)
        # a plain mean until the EMA takes over: the minimum of a few samples would cost a probed depth
        # below the long-measured plain rounds it is compared with (noise only ever looks like a bargain)
        new = self._average(old, seconds, n + 1)
        self.seconds[key] = new
        self.count[key] = n + 1
        if old is not None and depth == self.best.get(b):  # drift shared by all depths
            for d in range(self.max_depth + 1):
                if d != depth and (b, d) in self.seconds:
                    self.seconds[(b, d)] *= new / old
        else:  # a ratio between depths changed
            self._relative.clear()


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
