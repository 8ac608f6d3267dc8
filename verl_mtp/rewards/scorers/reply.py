"""Grader for a pretrained chat model asked our synthetic task in plain words: its answer is the last
integer of the reply ("16 - 2 = 14", "So 15 - 14 is 1."). Scores as math_dapo's: 1.0 right, -1.0 wrong,
with ``acc`` and ``pred`` logged per sample."""

from __future__ import annotations

import re

_INTEGER = re.compile(r"-?\d+")


def compute_score(solution_str: str, ground_truth: str) -> dict:
    found = _INTEGER.findall(solution_str)
    pred = found[-1] if found else ""
    correct = pred != "" and int(pred) == int(str(ground_truth).strip())
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
