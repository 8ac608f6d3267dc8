"""DAPO's grader for responses that end with an ``Answer: <value>`` line, with verl's exact results.

The DAPO recipe's published numbers rest on verl's ``math_dapo.compute_score`` (a Minerva-style
string normalisation), so this module reproduces its behaviour on every input, quirks included:
it only reads the last 300 characters, compares normalised *strings* (``42.0`` is not ``42``,
full-width digits are not digits, ``1,2`` is ``12``), and strips units by plain substring removal.
``math_dapo_lenient`` is our more forgiving grader, selected by name where wanted.

    compute_score("... so the total is 42.\\nAnswer: 42", "42")
    -> {"score": 1.0, "acc": True, "pred": "42"}

One extension: a list ground truth accepts any of its entries (verl fails on a list), and a
non-string one is compared as ``str(ground_truth)``.
"""

from __future__ import annotations

import re
from typing import Any

TAIL_CHARS = 300  # verl's window; the longest MATH-500 answer is 159 characters
STRICT_BOX_TAIL_CHARS = 100  # verl's window for strict \boxed{} checking
NO_ANSWER = "[INVALID]"  # what is normalised in place of a missing answer line (verl's marker)
ANSWER_PATTERN = r"(?i)Answer\s*:\s*([^\n]+)"  # \s* may cross a line break: "Answer:\n42" reads 42

# Literal rewrites, applied in this order before the removals below. Order matters: spaces go
# only after "an " / "a " are dropped, and "mbox" becomes "text" before "\text{and}" is matched.
_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""),
    ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)

# Substrings deleted wherever they occur (also inside words: "cm" goes from "acme" too).
_REMOVALS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}",
    "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)

# Regex rewrites after the literal ones, in order: keep the first $...$ span of each line,
# unwrap \text{} / \textbf{} / \overline{} (up to the first "}"), unwrap \boxed{} (up to the
# last "}"), then expand shorthand \frac12 -> \frac{1}{2} and \sqrt3 -> \sqrt{3}.
_REGEX_REWRITES = tuple((re.compile(pattern), repl) for pattern, repl in (
    (r".*?\$(.*?)\$.*", r"$\1$"),
    (r"\\text\{(.*?)\}", r"\1"),
    (r"\\textbf\{(.*?)\}", r"\1"),
    (r"\\overline\{(.*?)\}", r"\1"),
    (r"\\boxed\{(.*)\}", r"\1"),
    (r"frac([^{])(.)", r"frac{\1}{\2}"),
    (r"sqrt([^{])", r"sqrt{\1}"),
))


def normalize_final_answer(answer: str) -> str:
    """Canonical text of an answer: the part after the last ``=``, without LaTeX decoration,
    units and spaces; a number written with commas loses them (``1,000`` -> ``1000``)."""
    text = answer.split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        text = text.replace(old, new)
    for removed in _REMOVALS:
        text = text.replace(removed, "")
    for pattern, repl in _REGEX_REWRITES:
        text = pattern.sub(repl, text)
    text = text.replace("$", "")
    if text.replace(",", "").isdigit():  # str.isdigit: also true for full-width or superscript digits
        text = text.replace(",", "")
    return text.strip()


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}`` of ``text`` including the command and its braces, or None when
    there is none or it is never closed."""
    start = text.rfind("\\boxed{")
    return None if start < 0 else balanced_from(text, start)


def balanced_from(text: str, start: int) -> str | None:
    """``text`` from ``start`` to the brace that closes the first one opened there; None if never closed."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if text[index] == "}" and depth == 0:
            return text[start:index + 1]
    return None


def remove_boxed(boxed: str) -> str:
    """``\\boxed{content}`` -> ``content``."""
    prefix = "\\boxed{"
    if not (boxed.startswith(prefix) and boxed.endswith("}")):
        raise ValueError(f"not a \\boxed{{...}} expression: {boxed!r}")
    return boxed[len(prefix):-1]


def is_correct_minerva(
    solution_str: str, gt: str, gt_need_extract: bool = False, answer_pattern: str = ANSWER_PATTERN
) -> tuple[bool, str]:
    """Whether the normalised last answer-pattern match equals the normalised ground truth
    (taken from the ground truth's last ``\\boxed{}`` when ``gt_need_extract``), and that answer."""
    matches = re.findall(answer_pattern, solution_str)
    pred = normalize_final_answer(matches[-1] if matches else NO_ANSWER)
    if gt_need_extract:
        boxed = last_boxed_only_string(gt)
        if boxed is None:
            raise ValueError(f"ground truth has no \\boxed{{}} to extract: {gt!r}")
        gt = remove_boxed(boxed)
    return pred == normalize_final_answer(gt), pred


def is_correct_strict_box(
    pred: str, gt: str, pause_tokens_index: list[int] | None = None
) -> tuple[int, str | None]:
    """+1 / -1: whether the last ``\\boxed{}`` of the final 100 characters (or of the 100 before
    the last of four pause-token positions) is the ground truth verbatim; and that box's content."""
    if pause_tokens_index is not None:
        if len(pause_tokens_index) != 4:
            raise ValueError(f"pause_tokens_index must hold 4 positions, got {len(pause_tokens_index)}")
        window = pred[pause_tokens_index[-1] - STRICT_BOX_TAIL_CHARS:]
    else:
        window = pred[-STRICT_BOX_TAIL_CHARS:]
    boxed = last_boxed_only_string(window)
    extracted = None if boxed is None else remove_boxed(boxed)
    return (1 if extracted == gt else -1), extracted


def verify(
    solution_str: str, answer: str, strict_box_verify: bool = False, pause_tokens_index: list[int] | None = None
) -> tuple[bool, str | None]:
    """(correct, extracted prediction) with the strict box check or the Minerva one."""
    if strict_box_verify:
        score, pred = is_correct_strict_box(solution_str, answer, pause_tokens_index)
        return score == 1, pred
    return is_correct_minerva(solution_str, answer)


def compute_score(
    solution_str: str,
    ground_truth: Any,
    strict_box_verify: bool = False,
    pause_tokens_index: list[int] | None = None,
) -> dict[str, Any]:
    """``{"score": 1.0 | -1.0, "acc": bool, "pred": str | None}`` for the response's tail."""
    tail = solution_str[-TAIL_CHARS:]
    truths = ground_truth if isinstance(ground_truth, list) else [ground_truth]
    if not truths:
        raise ValueError("ground truth is an empty list")
    for truth in truths:
        correct, pred = verify(tail, str(truth), strict_box_verify, pause_tokens_index)
        if correct:
            break
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
