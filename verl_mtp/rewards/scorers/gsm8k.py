"""GSM8K grader with verl's results: the number after the last ``#### `` (strict) or the last
number anywhere (flexible), in the response's final 300 characters, compared as a string.

    compute_score("... so she pays 18 dollars.\\n#### 18", "18") -> 1.0

Scores are verl's: ``score`` when right, ``format_score`` (0) when a number was found but is
wrong, 0 when none was.
"""

from __future__ import annotations

import re

TAIL_CHARS = 300
_STRICT = re.compile(r"#### (-?[0-9.,]+)")
_ANY_NUMBER = re.compile(r"(-?[0-9.,]+)")


def extract_solution(solution_str: str, method: str = "strict") -> str | None:
    """The final answer: strict takes the last ``#### N`` without commas; flexible the last
    number-like run that is not a bare ``.``."""
    tail = solution_str[-TAIL_CHARS:]
    if method == "strict":
        found = _STRICT.findall(tail)
        return found[-1].replace(",", "") if found else None
    if method == "flexible":
        found = _ANY_NUMBER.findall(tail)
        valid = [n for n in found if n != "."]
        # verl's loop leaves its variable on the first match when every match is a bare "."
        return valid[-1] if valid else (found[0] if found else None)
    raise ValueError(f"gsm8k method must be 'strict' or 'flexible', got {method!r}")


def compute_score(
    solution_str: str, ground_truth: str, method: str = "strict", format_score: float = 0.0, score: float = 1.0
) -> float:
    answer = extract_solution(solution_str, method)
    if answer is None:
        return 0.0
    return score if answer == ground_truth else format_score
