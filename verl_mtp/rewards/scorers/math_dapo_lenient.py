"""A more forgiving grader for ``Answer: <value>`` lines than verl's ``math_dapo`` (ours before it
matched verl): numbers compare by value (``42.0``, ``+3``, ``007``, ``1,000``), ``\\dfrac``, ``\\%``,
degree signs, unit words and trailing periods are ignored, and ``1,2`` stays a pair. Selected by
``lenient_compute_score`` (see ``scorers``); DAPO's published numbers use ``math_dapo``.

Only the tail of a response is read, as in verl: the answer belongs at the end, and a response
must not earn credit for an ``Answer:`` line it wrote early and then kept talking past.

    compute_score("... so the total is 42.\\nAnswer: 42.0", "42")
    -> {"score": 1.0, "acc": True, "pred": "42"}
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Callable
from typing import Any

TAIL_CHARS = 300  # verl's window; the longest MATH-500 answer is 159 characters
STRICT_BOX_TAIL_CHARS = 100  # verl's window for strict \boxed{} checking
NO_ANSWER = "[INVALID]"  # the "pred" of a response with no answer (verl's marker)

_ANSWER_LINE = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)

# Commands whose argument is the answer itself: \boxed{42} -> 42, \text{ cm} -> " cm".
_WRAPPERS = ("boxed", "text", "textbf", "mathrm", "mbox", "overline")

# Plain-text rewrites applied in order; most drop LaTeX spacing and decoration.
_REWRITES = (
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\%", ""), ("%", ""),
    ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""),
    ("\\ldots", ""), ("\\dots", ""), ('"', ""),
)

# Unit and filler words that answers carry but ground truths do not ("10 dollars" vs "10").
# Matched only where not part of a longer word, so "cm" goes but "acme" keeps its letters.
_UNIT_WORDS = re.compile(
    r"(?<![A-Za-z])(?:"
    r"degrees|units|square|inches|inch|feet|foot|meters|meter|cm|km|mph|hours|minutes|"
    r"seconds|dollars|cents|pounds|ways|points|digits|students|edges|integers|multiples|meals"
    r")(?![A-Za-z])"
)

# A plain number; commas only as thousands separators, so a pair "1,2" stays a pair.
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
_EXACT = decimal.Context(prec=1000)  # no rounding of long integer answers


def extract_answer(text: str) -> str | None:
    """What follows the last ``Answer:`` (any case) up to the end of its line, or None."""
    matches = _ANSWER_LINE.findall(text)
    return matches[-1] if matches else None


def last_boxed_content(text: str) -> str | None:
    """The argument of the last ``\\boxed{...}`` in ``text`` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    group = _braced_group(text, start + len("\\boxed"))
    return None if group is None else group[0]


def normalize_final_answer(answer: str) -> str:
    """Canonical text of an answer, so that equal answers compare equal as strings."""
    text = answer.replace("\\$", "").replace("$", "")
    for command in _WRAPPERS:
        text = _unwrap(text, command)
    text = text.split("=")[-1]  # "x = 5" -> "5"
    for old, new in _REWRITES:
        text = text.replace(old, new)
    text = _UNIT_WORDS.sub("", text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    return _canonical_number(_expand_shorthand(text))


def compute_score(
    solution_str: str,
    ground_truth: Any,
    strict_box_verify: bool = False,
    pred_extractor: Callable[[str], str | None] = extract_answer,
) -> dict[str, Any]:
    """+1 if the response's final answer equals the ground truth (any of them, for a list), else -1.

    ``strict_box_verify`` compares the last ``\\boxed{}`` of the final 100 characters to the
    ground truth verbatim, without normalisation (verl's strict mode). ``pred_extractor`` pulls
    the raw answer out of the response tail; the default reads the last ``Answer:`` line.
    """
    tail = solution_str[-TAIL_CHARS:]
    truths = [str(truth) for truth in (ground_truth if isinstance(ground_truth, list) else [ground_truth])]
    if strict_box_verify:
        pred = last_boxed_content(tail[-STRICT_BOX_TAIL_CHARS:])
    else:
        raw = pred_extractor(tail)
        pred = None if raw is None else normalize_final_answer(raw)
        truths = [normalize_final_answer(truth) for truth in truths]
    correct = pred is not None and pred in truths
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": NO_ANSWER if pred is None else pred}


def _braced_group(text: str, open_index: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``open_index`` and the index just past it."""
    depth = 0
    for index in range(open_index, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[open_index + 1:index], index + 1
    return None


def _unwrap(text: str, command: str) -> str:
    """Replaces every ``\\command{arg}`` by ``arg``; an unclosed one loses just its name."""
    prefix = f"\\{command}{{"
    while (start := text.find(prefix)) >= 0:
        group = _braced_group(text, start + len(prefix) - 1)
        if group is None:
            text = text[:start] + text[start + len(prefix):]
        else:
            text = text[:start] + group[0] + text[group[1]:]
    return text


def _expand_shorthand(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}`` and ``\\sqrt3`` -> ``\\sqrt{3}``, as models often write them."""
    text = re.sub(r"\\frac([^{\\])([^{\\])", r"\\frac{\1}{\2}", text)
    return re.sub(r"\\sqrt([^{\\])", r"\\sqrt{\1}", text)


def _canonical_number(text: str) -> str:
    """"1,000" -> "1000", "42.0" -> "42", "0.50" -> "0.5", "+3" -> "3"; anything else unchanged."""
    if not _NUMBER.fullmatch(text):
        return text
    value = decimal.Decimal(text.replace(",", ""))
    return "0" if value == 0 else format(_EXACT.normalize(value), "f")
