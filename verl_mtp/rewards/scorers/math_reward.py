"""MATH grader with verl's results (its ``math_reward``, the Hendrycks MATH string normalisation):
the last ``\\boxed{}`` (or ``\\boxed x``, ``\\fbox{}``) of the response, normalised, equals the
normalised ground truth. verl routes lighteval/MATH, MATH-lighteval and MATH-500 here.

    compute_score("... so \\boxed{\\dfrac{1}{2}}", "0.5") -> 1.0

Scores are verl's 1.0 / 0.0 (``math_dapo`` gives 1 / -1). An answer the normalisation cannot
handle (``\\sqrt`` or ``\\frac`` at its very end, two ``\\text{ `` units) is compared verbatim, as
in verl. One extension: a list ground truth accepts any of its entries, and a non-string one is
compared as ``str(ground_truth)``.
"""

from __future__ import annotations

from typing import Any

from .math_dapo import balanced_from


class _CannotNormalise(Exception):
    """Raised where verl's normalisation fails (it then compares the raw strings)."""


def last_boxed_only_string(text: str) -> str | None:
    """The last boxed answer with its command: ``\\boxed x`` up to a ``$`` (when any ``\\boxed ``
    occurs), else the last ``\\boxed...{...}`` or ``\\fbox{...}`` with balanced braces, or None."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
    return None if start < 0 else balanced_from(text, start)


def remove_boxed(boxed: str) -> str | None:
    """The argument of ``\\boxed x`` or ``\\boxed{x}``; None for anything else (``\\fbox{x}``)."""
    if "\\boxed " in boxed:
        return boxed[len("\\boxed "):] if boxed.startswith("\\boxed ") else None
    if boxed.startswith("\\boxed{") and boxed.endswith("}"):
        return boxed[len("\\boxed{"):-1]
    return None


def _remove_right_units(text: str) -> str:
    """``5 \\text{ cm}`` -> ``5 ``: a unit is what follows the only ``\\text{ ``."""
    if "\\text{ " not in text:
        return text
    parts = text.split("\\text{ ")
    if len(parts) != 2:
        raise _CannotNormalise
    return parts[0]


def _fix_sqrt(text: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``."""
    head, *rest = text.split("\\sqrt")
    for part in rest:
        if not part:
            raise _CannotNormalise
        head += "\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return head


def _fix_fracs(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``."""
    head, *rest = text.split("\\frac")
    for part in rest:
        if not part:
            raise _CannotNormalise
        head += "\\frac"
        if part[0] == "{":
            head += part
        elif len(part) < 2:
            return text
        elif part[1] != "{":
            head += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            head += "{" + part[0] + "}" + part[1:]
    return head


def _fix_a_slash_b(text: str) -> str:
    """``3/4`` -> ``\\frac{3}{4}`` for plain integers only."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return text
    return f"\\frac{{{a}}}{{{b}}}" if text == f"{a}/{b}" else text


_REWRITES = (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
             ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""))


def strip_string(text: str) -> str:
    """The Hendrycks MATH normalisation, step for step as verl applies it."""
    for old, new in _REWRITES:
        text = text.replace(old, new)
    text = _remove_right_units(text)
    text = text.replace("\\\\%", "").replace("\\%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    lhs, *rhs = text.split("=")
    if len(rhs) == 1 and len(lhs) <= 2:  # "k = 5" -> " 5"
        text = rhs[0]
    text = _fix_fracs(_fix_sqrt(text).replace(" ", ""))
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_a_slash_b(text)


def is_equiv(answer: str | None, truth: str | None) -> bool:
    if answer is None or truth is None:
        return answer is None and truth is None
    try:
        return strip_string(answer) == strip_string(truth)
    except _CannotNormalise:
        return answer == truth


def compute_score(solution_str: str, ground_truth: Any) -> float:
    """1.0 if the last boxed answer equals the ground truth (any of them, for a list), else 0.0."""
    boxed = last_boxed_only_string(solution_str)
    answer = None if boxed is None else remove_boxed(boxed)
    if answer is None:
        return 0.0
    truths = ground_truth if isinstance(ground_truth, list) else [ground_truth]
    return 1.0 if any(is_equiv(answer, None if truth is None else str(truth)) for truth in truths) else 0.0
