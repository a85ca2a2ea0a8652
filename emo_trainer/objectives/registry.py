"""Registry of objectives: ``register`` a class, ``get_objective`` builds one by name."""

from __future__ import annotations

import inspect
from typing import Any

from .base import Objective

_REGISTRY: dict[str, type[Objective]] = {}

#: Objectives the project plans but that are not importable yet (clear error, never a fallback).
PLANNED: set[str] = {"emo", "mixce", "mile", "sequencematch", "dft", "tailr", "focal", "eaft"}


class ObjectiveError(ValueError):
    """Unknown objective or bad objective option."""


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    _REGISTRY[cls.name] = cls
    PLANNED.discard(cls.name)
    return cls


def available() -> list[str]:
    """Names of the registered objectives, sorted."""
    return sorted(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    """The class registered as ``name``; a clear error for unknown or not-yet-implemented names."""
    key = str(name).lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in PLANNED:
        raise ObjectiveError(f"objective '{name}' is not implemented yet; available: {', '.join(available())}")
    raise ObjectiveError(f"unknown objective '{name}'; choose one of: {', '.join(available())}")


def objective_options(name: str) -> dict[str, inspect.Parameter]:
    """The options (``__init__`` keyword arguments) of objective ``name``."""
    sig = inspect.signature(objective_class(name).__init__)
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {k: p for k, p in sig.parameters.items() if k != "self" and p.kind in kinds}


def get_objective(name: str, **options: Any) -> Objective:
    """Build objective ``name`` with ``options``; unknown options are rejected by name."""
    cls = objective_class(name)
    known = objective_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ObjectiveError(
            f"unknown option(s) {', '.join(unknown)} for objective '{name}'; "
            f"its options are: {', '.join(known) or '(none)'}"
        )
    return cls(**options)
