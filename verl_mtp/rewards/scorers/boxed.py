"""Lenient grader for MATH-style responses (``lenient_compute_score``; verl's own is ``math_reward``):
the last ``\\boxed{}`` is compared to the ground truth with math_verify, which parses both into
sympy and checks equivalence (``\\frac{1}{2}`` equals ``0.5``, ``(x+1)^2`` equals ``x^2+2x+1``).

Scores are +1 / -1 like math_dapo (verl's MATH grader gives 1 / 0) so that data sources can be
mixed in one batch without one of them carrying a different reward scale.
"""

from __future__ import annotations

import logging
from typing import Any

from math_verify import parse, verify

from .math_dapo_lenient import NO_ANSWER, last_boxed_content


class _DropTimeoutDisabledNotice(logging.Filter):
    """math_verify warns once per process that its timeouts are off; here that is by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledNotice())


def compute_score(solution_str: str, ground_truth: Any) -> dict[str, Any]:
    """+1 if the last ``\\boxed{}`` of the response is equivalent to the ground truth (any of them,
    for a list), else -1. A ground truth may itself be boxed."""
    pred = last_boxed_content(solution_str)
    truths = ground_truth if isinstance(ground_truth, list) else [ground_truth]
    correct = pred is not None and any(_equivalent(pred, str(truth)) for truth in truths)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": NO_ANSWER if pred is None else pred}


def _equivalent(pred: str, truth: str) -> bool:
    boxed_truth = last_boxed_content(truth)
    gold = truth if boxed_truth is None else boxed_truth
    try:
        # math_verify's own timeouts use SIGALRM, which works only in a main thread; the scoring
        # pool enforces the time limit instead, so they are switched off.
        return verify(
            parse(f"\\boxed{{{gold}}}", parsing_timeout=None),
            parse(f"\\boxed{{{pred}}}", parsing_timeout=None),
            timeout_seconds=None,
        )
    except Exception:  # sympy can fail on odd input; an answer that cannot be checked is wrong
        return False
