"""Name → function tables for advantage estimators and policy losses.

A config names a built-in (``algorithm.adv_estimator=grpo``) or a user extension by dotted
path (``my_pkg.losses:my_loss``), so new algorithms plug in without editing this package.
"""

from __future__ import annotations

import importlib
from typing import Callable

_TABLES: dict[str, dict[str, Callable]] = {"adv_estimator": {}, "policy_loss": {}}


def _register(kind: str, name: str) -> Callable[[Callable], Callable]:
    def decorator(fn: Callable) -> Callable:
        table = _TABLES[kind]
        # Two functions under one name would make the config silently pick whichever loaded last.
        if table.get(name, fn) is not fn:
            raise ValueError(f"{kind} {name!r} is already registered to {table[name].__qualname__}")
        table[name] = fn
        return fn

    return decorator


def _load_dotted(kind: str, path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load {kind} {path!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"{kind} {path!r} is not callable")
    return fn


def _get(kind: str, name: str) -> Callable:
    table = _TABLES[kind]
    if name in table:
        return table[name]
    if ":" in name:
        return _load_dotted(kind, name)
    known = ", ".join(sorted(table))
    raise ValueError(f"unknown {kind} {name!r}; known: {known}, or a dotted path 'pkg.module:function'")


def register_adv_estimator(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn(scores, response_mask, group_index, **options)`` selectable by name."""
    return _register("adv_estimator", name)


def get_adv_estimator(name: str) -> Callable:
    """The estimator registered as ``name``, or the function at dotted path ``pkg.mod:fn``."""
    return _get("adv_estimator", name)


def register_policy_loss(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a function with ``compute_policy_loss``'s signature selectable by name."""
    return _register("policy_loss", name)


def get_policy_loss(name: str) -> Callable:
    """The policy loss registered as ``name``, or the function at dotted path ``pkg.mod:fn``."""
    return _get("policy_loss", name)
