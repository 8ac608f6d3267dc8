"""Reward functions: the built-in graders chosen by data source, and user functions by reference.

Every reward function has verl's signature

    compute_score(data_source, solution_str, ground_truth, extra_info=None, **reward_kwargs)
        -> float | dict   (a dict must hold "score"; its other keys are logged per sample)

A *scorer reference* names one in a form that pickles, so worker processes can load it:

    None                          default_compute_score below
    "pkg.module:function"         an importable function
    "path/to/file.py[:function]"  a function in a file (default name "compute_score")
    ("path/to/file.py", "name")   the same, as verl's custom_reward_function.{path,name}; the path
                                  may also be "pkg://pkg.module" or "file://path", as in verl

``default_compute_score`` routes data sources as verl's does, to graders with verl's results;
``lenient_compute_score`` routes the same way to our more forgiving graders: values, not strings,
are compared (``custom_reward_function.path=pkg://verl_mtp.rewards.scorers`` and
``custom_reward_function.name=lenient_compute_score``). ``tidy_compute_score`` is the default grader with
a format penalty for the synthetic task's traces (``custom_reward_function.reward_kwargs.weight``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

from verl_mtp.data.rl_dataset import DataError

from . import gsm8k, math_dapo, math_dapo_lenient, math_reward, reply

ScorerRef = str | tuple[str, str] | None

# Data sources graded by the Answer-line grader: verl's, plus our synthetic task (and every "aime*").
ANSWER_LINE_SOURCES = ("math_dapo", "math", "math_dapo_reasoning", "synthetic_math")
BOXED_SOURCES = ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500")
GSM8K_SOURCES = ("openai/gsm8k",)
# Our task asked of a pretrained chat model, which answers in its own words ("16 - 2 = 14"): the last
# integer of the reply is its answer (scorers/reply.py).
REPLY_SOURCES = ("synthetic_math_chat",)
# verl grades these with scorers we do not ship (prime_math, code sandboxes, geo3k, search-R1 EM).
_VERL_ONLY_SOURCES = (
    "numina_aops_forum", "numina_synthetic_math", "numina_amc_aime", "numina_synthetic_amc", "numina_cn_k12",
    "numina_olympiads", "codecontests", "apps", "codeforces", "taco", "hiyouga/geometry3k", "searchR1_nq",
    "searchR1_triviaqa", "searchR1_popqa", "searchR1_hotpotqa", "searchR1_2wikimultihopqa", "searchR1_musique",
    "searchR1_bamboogle",
)


def default_compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None
) -> dict[str, Any] | float:
    """Scores with the grader verl's ``default_compute_score`` picks for ``data_source``."""
    return _route(data_source, solution_str, ground_truth, math_dapo.compute_score, math_reward.compute_score)


def lenient_compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None
) -> dict[str, Any] | float:
    """``default_compute_score`` with ``math_dapo_lenient`` for the Answer-line sources (numbers
    compared by value: ``42.0`` is ``42``; ``\\dfrac``, ``\\%`` and trailing periods ignored) and
    math_verify's equivalence (``boxed``, scores +1 / -1) for the MATH sources."""
    return _route(data_source, solution_str, ground_truth, math_dapo_lenient.compute_score, _math_verify)


_TRACE_LINE = re.compile(r"^\d+( *)[+-]( *)\d+( *)=( *)\d+$|^Answer:( *)\S")  # the synthetic task's lines


def tidy_compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None, weight: float = 1.0
) -> dict[str, Any]:
    """``default_compute_score`` minus ``weight`` x the share of the gaps in the answer's trace lines
    (`x op y = z`, `Answer: N`) that do not hold exactly one space: a format reward for the task's house
    style `17 + 5 = 22` (the quickstart's shift scenario), logged as ``untidy_share``. It does not depend
    on the answer's length, so a step left out earns nothing; an answer without trace lines counts as
    untidy."""
    result = default_compute_score(data_source, solution_str, ground_truth, extra_info)
    result = dict(result) if isinstance(result, dict) else {"score": float(result), "acc": float(result) > 0}
    gaps = [g for line in solution_str.splitlines() if (m := _TRACE_LINE.match(line.strip()))
            for g in m.groups() if g is not None]
    share = sum(g != " " for g in gaps) / len(gaps) if gaps else 1.0
    return {**result, "score": result["score"] - weight * share, "untidy_share": share}


def _math_verify(solution_str: str, ground_truth: Any) -> dict[str, Any]:
    from . import boxed  # imports sympy; workers that never grade MATH-style data skip that

    return boxed.compute_score(solution_str, ground_truth)


def _route(data_source: str, solution_str: str, ground_truth: Any, answer_line: Callable, math: Callable
           ) -> dict[str, Any] | float:
    source = str(data_source)
    if source in ANSWER_LINE_SOURCES or source.startswith("aime"):
        return answer_line(solution_str, ground_truth)
    if source in GSM8K_SOURCES:
        return gsm8k.compute_score(solution_str, ground_truth)
    if source in REPLY_SOURCES:
        return reply.compute_score(solution_str, ground_truth)
    if source in BOXED_SOURCES:
        return math(solution_str, ground_truth)
    if source in _VERL_ONLY_SOURCES:
        raise ValueError(f"data_source={source!r} needs a grader verl has and verl_mtp does not; "
                         f"set custom_reward_function.path to grade it")
    known = ", ".join((*ANSWER_LINE_SOURCES, "aime*", *GSM8K_SOURCES, *REPLY_SOURCES, *BOXED_SOURCES))
    raise ValueError(
        f"no built-in reward function for data_source={source!r} (known: {known}); "
        f"set custom_reward_function.path to grade it"
    )


def check_data_sources(sources: Iterable[str], where: str) -> None:
    """A DataError (one line, naming ``where``) for the first data source the built-in graders do
    not take, so that a run fails at start instead of scoring every sample as a failure."""
    for source in sorted(set(sources)):
        try:
            default_compute_score(source, "", "")  # only a source without a grader fails on an empty response
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None


def load_custom_reward_function(path: str, name: str = "compute_score") -> Callable:
    """The function ``name`` defined in the Python file at ``path`` (``file://`` optional), or in
    the module ``pkg://pkg.module`` (``pkg://pkg/module`` too), as verl accepts them."""
    if path.startswith("pkg://"):
        return _import_function(path[len("pkg://"):].replace("/", "."), name)
    file = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
    if not os.path.isfile(file):
        raise FileNotFoundError(f"custom_reward_function.path={path!r}: no such file")
    module_name = "_verl_mtp_reward_" + re.sub(r"\W", "_", file)
    loader = importlib.machinery.SourceFileLoader(module_name, file)  # any file name, not only *.py
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(module_name, file, loader=loader))
    sys.modules[module_name] = module  # before running it: dataclasses in the file look themselves up there
    loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise AttributeError(f"custom_reward_function.name={name!r}: {file} defines no function of that name")
    return function


def resolve_scorer(ref: ScorerRef) -> Callable:
    """The reward function a scorer reference names (see the module docstring for the forms)."""
    if ref is None:
        return default_compute_score
    if isinstance(ref, tuple):
        return load_custom_reward_function(*ref)
    target, sep, name = ref.rpartition(":")
    if not sep:
        target, name = ref, "compute_score"
    if target.endswith(".py"):
        return load_custom_reward_function(target, name)
    return _import_function(target, name)


def _import_function(module_name: str, name: str) -> Callable:
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load reward function {module_name}:{name}: {err}") from err
    if not callable(function):
        raise ValueError(f"reward function {module_name}:{name} is not callable")
    return function
