"""Reward managers: turn decoded samples into one reward per sequence, selected by
``reward_model.reward_manager``.

    naive   reward = the reward function's score
    dapo    the same plus DAPO's soft overlong punishment:
            expected_len = max_resp_len - len
            reward += min(-(response_length - expected_len) / len * penalty_factor, 0)
            i.e. 0 up to expected_len, falling linearly to -penalty_factor at max_resp_len.

The reward function runs in a ScoringPool, so a failing, hanging or crashing call gives that
sample ``failure_score`` (default -1, the score of a wrong answer: a failure must never pay
better than being wrong, or the policy learns to make the grader fail) and is counted.

    manager = build_reward_manager("dapo", max_resp_len=512,
                                   overlong_buffer_cfg={"enable": True, "len": 128, "penalty_factor": 1.0})
    with manager:
        result = manager(samples)   # result.scores, result.extra, result.metrics
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .pool import DEFAULT_NUM_WORKERS, FAILURE_KINDS, ScoreOutcome, ScoringPool, failure_metric
from .scorers import ScorerRef

REWARD_MANAGERS: dict[str, type[NaiveRewardManager]] = {}

_OVERLONG_KEY = "reward_model.reward_kwargs.overlong_buffer_cfg"
_OVERLONG_DEFAULTS = {"enable": False, "len": 0, "penalty_factor": 1.0, "log": False}


@dataclass
class RewardSample:
    """One decoded response to score."""

    response_str: str
    response_length: int  # valid response tokens; what overlong shaping measures
    data_source: str  # selects the built-in grader
    ground_truth: Any
    extra_info: dict | None = None
    prompt_str: str | None = None  # for the driver's sample logs; reward functions do not get it (as in verl)


@dataclass
class RewardResult:
    """Rewards of one batch of samples."""

    scores: list[float]  # final per-sequence reward, used for advantages
    extra: dict[str, list] = field(default_factory=dict)  # per-sample values, one list entry per sample
    metrics: dict[str, float] = field(default_factory=dict)  # batch-level numbers to log


@dataclass(frozen=True)
class OverlongBuffer:
    """DAPO's soft overlong punishment over the last ``len`` tokens before ``max_resp_len``."""

    max_resp_len: int
    len: int
    penalty_factor: float
    log: bool  # also report per-sample "overlong_reward" and "overlong" in RewardResult.extra

    def penalty(self, response_length: int) -> float:
        exceed = response_length - (self.max_resp_len - self.len)
        return min(-exceed / self.len * self.penalty_factor, 0.0)


def register_reward_manager(name: str) -> Callable[[type], type]:
    """Class decorator adding a manager under ``name`` for ``reward_model.reward_manager``."""

    def decorator(cls: type) -> type:
        REWARD_MANAGERS[name] = cls
        return cls

    return decorator


@register_reward_manager("naive")
class NaiveRewardManager:
    """Reward = the reward function's score. Extra: every key of the dicts it returns, plus
    "reward_failure" ("" or the failure kind) per sample."""

    # verl's DAPO manager also logs a plain-number score as the sample's "acc"; its naive one does not
    score_is_acc = False

    def __init__(self, pool: ScoringPool) -> None:
        self.pool = pool
        # Every extra key seen so far and the value a sample lacking it gets; kept across batches
        # so that batches a driver concatenates (DAPO dynamic sampling) carry the same keys.
        self._extra_defaults: dict[str, Any] = {}

    def __call__(self, samples: list[RewardSample]) -> RewardResult:
        outcomes = self.pool.score([_call_kwargs(sample) for sample in samples])
        return RewardResult(
            scores=[outcome.result["score"] for outcome in outcomes],
            extra=self._extra(outcomes),
            metrics=_failure_metrics(outcomes),
        )

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> NaiveRewardManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _extra(self, outcomes: list[ScoreOutcome]) -> dict[str, list]:
        if self.score_is_acc:
            outcomes = [_score_as_acc(outcome) for outcome in outcomes]
        for outcome in outcomes:
            for key, value in outcome.result.items():
                self._extra_defaults.setdefault(key, _empty_like(value))
        extra = {
            key: [outcome.result.get(key, default) for outcome in outcomes]
            for key, default in self._extra_defaults.items()
        }
        extra["reward_failure"] = [outcome.failure or "" for outcome in outcomes]
        return extra


@register_reward_manager("dapo")
class DAPORewardManager(NaiveRewardManager):
    """The naive reward plus the overlong penalty when ``overlong_buffer_cfg.enable`` is set. A reward
    function's plain-number score (MATH, gsm8k graders) is also its "acc", as in verl."""

    score_is_acc = True

    def __init__(
        self, pool: ScoringPool, max_resp_len: int | None = None, overlong_buffer_cfg: Any = None
    ) -> None:
        super().__init__(pool)
        self.overlong = _overlong_buffer(overlong_buffer_cfg, max_resp_len)

    def __call__(self, samples: list[RewardSample]) -> RewardResult:
        result = super().__call__(samples)
        if self.overlong is None or not samples:
            return result
        penalties = [self.overlong.penalty(sample.response_length) for sample in samples]
        result.scores = [score + penalty for score, penalty in zip(result.scores, penalties)]
        if self.overlong.log:
            result.extra["overlong_reward"] = penalties
            result.extra["overlong"] = [penalty < 0 for penalty in penalties]
        result.metrics["reward/overlong_penalty_mean"] = sum(penalties) / len(penalties)
        result.metrics["reward/overlong_ratio"] = sum(penalty < 0 for penalty in penalties) / len(penalties)
        return result


def build_reward_manager(
    name: str,
    compute_score_ref: ScorerRef = None,
    num_workers: int = DEFAULT_NUM_WORKERS,
    timeout_s: float | None = 10.0,
    failure_score: float = -1.0,
    scorer_kwargs: Mapping[str, Any] | None = None,
    **reward_kwargs: Any,
) -> NaiveRewardManager:
    """The manager registered as ``name``, scoring with ``compute_score_ref`` (None: built-in
    graders by data source). ``reward_kwargs`` are the manager's (``reward_model.reward_kwargs``);
    ``scorer_kwargs`` go to every reward function call (``custom_reward_function.reward_kwargs``)."""
    if name not in REWARD_MANAGERS:
        known = ", ".join(sorted(REWARD_MANAGERS))
        raise ValueError(f"reward_model.reward_manager={name!r} is unknown; known: {known}")
    manager_cls = REWARD_MANAGERS[name]
    accepted = sorted(set(inspect.signature(manager_cls).parameters) - {"pool"})
    for key in reward_kwargs:
        if key not in accepted:
            raise ValueError(
                f"reward_model.reward_kwargs.{key} is not accepted by reward manager {name!r} "
                f"(accepts: {', '.join(accepted) or 'nothing'})"
            )
    pool = ScoringPool(compute_score_ref, num_workers=num_workers, timeout_s=timeout_s,
                       failure_score=failure_score, scorer_kwargs=scorer_kwargs)
    return manager_cls(pool, **reward_kwargs)


def _call_kwargs(sample: RewardSample) -> dict[str, Any]:
    return {
        "data_source": sample.data_source,
        "solution_str": sample.response_str,
        "ground_truth": sample.ground_truth,
        "extra_info": sample.extra_info,
    }


def _score_as_acc(outcome: ScoreOutcome) -> ScoreOutcome:
    """A plain-number result (``{"score": x}``) with ``acc = x``; failures and dicts stay as they are."""
    if outcome.failure is not None or outcome.result.keys() != {"score"}:
        return outcome
    return dataclasses.replace(outcome, result={**outcome.result, "acc": outcome.result["score"]})


def _empty_like(value: Any) -> Any:
    """What a sample without this key gets: False for flags such as "acc", "" for text, 0 for numbers."""
    try:
        return type(value)()
    except TypeError:
        return None


def _failure_metrics(outcomes: list[ScoreOutcome]) -> dict[str, float]:
    counts = Counter(outcome.failure for outcome in outcomes)
    return {failure_metric(kind): float(counts[kind]) for kind in FAILURE_KINDS}


def _overlong_buffer(cfg: Any, max_resp_len: int | None) -> OverlongBuffer | None:
    """The validated overlong settings from a dict, DictConfig or dataclass; None when disabled."""
    given = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {})
    for key in given:
        if key not in _OVERLONG_DEFAULTS:
            raise ValueError(f"{_OVERLONG_KEY}.{key} is not a known key (known: {', '.join(_OVERLONG_DEFAULTS)})")
    settings = {**_OVERLONG_DEFAULTS, **given}
    if not settings["enable"]:
        return None
    if not _is_int(max_resp_len) or max_resp_len <= 0:
        raise ValueError(
            f"reward_model.reward_kwargs.max_resp_len must be a positive integer when "
            f"{_OVERLONG_KEY}.enable is true, got {max_resp_len!r}"
        )
    if not _is_int(settings["len"]) or not 0 < settings["len"] <= max_resp_len:
        raise ValueError(
            f"{_OVERLONG_KEY}.len must be an integer in (0, max_resp_len={max_resp_len}], got {settings['len']!r}"
        )
    return OverlongBuffer(max_resp_len, settings["len"], float(settings["penalty_factor"]), bool(settings["log"]))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
