"""Reward functions: the built-in graders chosen by data source, and user functions by reference.

Every reward function has verl's signature

    compute_score(data_source, solution_str, ground_truth, extra_info=None, **reward_kwargs)
        -> float | dict   (a dict must hold "score"; its other keys are logged per sample)

A *scorer reference* names one in a form that pickles, so worker processes can load it:

    None                          default_compute_score below
    "pkg.module:function"         an importable function
    "path/to/file.py[:function]"  a function in a file (default name "compute_score")
    ("path/to/file.py", "name")   the same, as verl's custom_reward_function.{path,name}
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from . import math_dapo

ScorerRef = str | tuple[str, str] | None

_MATH_DAPO_SOURCES = ("math_dapo", "synthetic_math")  # and every "aime*" source
_BOXED_SOURCES = ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500", "math")


def default_compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None
) -> dict[str, Any]:
    """Scores with the grader that fits ``data_source``: ``Answer:`` lines or a final ``\\boxed{}``."""
    if data_source in _MATH_DAPO_SOURCES or str(data_source).startswith("aime"):
        return math_dapo.compute_score(solution_str, ground_truth)
    if data_source in _BOXED_SOURCES:
        from . import boxed  # imports sympy; workers that never grade MATH-style data skip that

        return boxed.compute_score(solution_str, ground_truth)
    known = ", ".join((*_MATH_DAPO_SOURCES, "aime*", *_BOXED_SOURCES))
    raise ValueError(
        f"no built-in reward function for data_source={data_source!r} (known: {known}); "
        f"set custom_reward_function.path to grade it"
    )


def load_custom_reward_function(path: str, name: str = "compute_score") -> Callable:
    """The function ``name`` defined in the Python file at ``path``."""
    file = os.path.abspath(os.path.expanduser(path))
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
