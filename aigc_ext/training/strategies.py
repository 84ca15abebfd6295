"""Builds a strategy (objective, augmentation, finetuner, transfer strategy) from its options.

A plugin registers a class or a function under a name; a configuration names it and gives
options. :func:`build` looks the name up (:func:`lookup`); :func:`instantiate` checks the
options against the constructor's (or the function's) parameters, fills parameters the
configuration left out from the dataset's ``info`` (``vocab_size``, ``pad_token_id``,
``num_labels``, ...) and instantiates the class, or binds the options to the function with
:func:`functools.partial`. :func:`check_options` is the check alone, for validating a
configuration without building anything.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "FAMILY_LABELS",
    "build",
    "call_options",
    "call_time_arguments",
    "check_options",
    "instantiate",
    "lookup",
]

FAMILY_LABELS = {
    "objectives": "objective",
    "augmentations": "augmentation",
    "finetuners": "finetuner",
    "transfer_strategies": "transfer strategy",
}

_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def lookup(family: str, name: str) -> Any:
    """The object registered as ``name`` in ``family``.

    An unknown name is a ValueError such as ``unknown objective 'x'; available: a, b``; an
    unknown family a KeyError listing the families.
    """
    from aigc_ext import plugins

    registry = plugins.get_registry(family)
    if name not in registry:
        label = FAMILY_LABELS.get(family, family)
        raise ValueError(
            f"unknown {label} {name!r}; available: {', '.join(registry.names()) or 'none'}"
        )
    return registry.get(name)


def _signature(obj: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have none
        return None


def call_options(
    fn: Callable,
    options: Mapping[str, Any] | None,
    info: Mapping[str, Any] | None = None,
    *,
    what: str,
    skip: int = 0,
    exclude: tuple[str, ...] = (),
    require: bool = False,
) -> dict[str, Any]:
    """The keyword arguments to call ``fn`` with.

    ``options`` must name parameters of ``fn`` (unless it takes ``**kwargs``): otherwise a
    ValueError names the key and the allowed keys. Parameters not in ``options`` whose name is a
    key of ``info`` are filled from it. ``skip`` leading positional parameters are not options
    (a model factory's ``info``) and parameters named in ``exclude`` (a dataset factory's
    ``seed``) are not options either. With ``require``, a parameter without default that is neither
    given nor filled is a ValueError (rather than a TypeError from the call).
    """
    options = dict(options or {})
    info = info or {}
    sig = _signature(fn)
    if sig is None:
        return options
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in _KEYWORD_KINDS[:1] or p.kind == p.POSITIONAL_ONLY]
    skipped = {p.name for p in positional[:skip]} | set(exclude)
    named = [p for p in params if p.kind in _KEYWORD_KINDS and p.name not in skipped]
    allowed = [p.name for p in named]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    if not takes_any:
        for key in options:
            if key not in allowed:
                raise ValueError(
                    f"{what}: unknown option {key!r}; allowed: {', '.join(allowed) or 'none'}"
                )
    kwargs = dict(options)
    for p in named:
        if p.name not in kwargs and p.name in info:
            kwargs[p.name] = info[p.name]
    if require:
        missing = [p.name for p in named if p.default is p.empty and p.name not in kwargs]
        if missing:
            raise ValueError(
                f"{what}: option {missing[0]!r} is required (not in the configuration and not "
                f"provided by the dataset's info)"
            )
    return kwargs


def call_time_arguments(fn: Callable) -> int:
    """How many leading positional parameters without default a function has: they are the
    arguments of each call (``batch``, ``model``), not options."""
    sig = _signature(fn)
    count = 0
    for p in sig.parameters.values() if sig is not None else ():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            count += 1
        else:
            break
    return count


def check_options(obj: Callable, options: Mapping[str, Any] | None, *, what: str) -> None:
    """Checks that every key of ``options`` names a parameter of strategy ``obj`` (a class's
    constructor, or a function past its call-time arguments); builds nothing. ValueError
    naming the key and the allowed ones."""
    skip = 0 if inspect.isclass(obj) else call_time_arguments(obj)
    call_options(obj, options, what=what, skip=skip)


def instantiate(
    obj: Callable,
    options: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    *,
    what: str,
) -> Any:
    """Strategy ``obj`` (a registered class or function) with ``options``, filled from ``info``.

    A class is called with the keyword arguments; a function (or other callable) is returned
    as ``functools.partial(obj, **kwargs)``. ValueError for an unknown option (listing the
    allowed ones), a required one that is missing, or a value the strategy rejects (its
    message, prefixed with ``what``).
    """
    is_class = inspect.isclass(obj)
    skip = 0 if is_class else call_time_arguments(obj)
    kwargs = call_options(obj, options, info, what=what, skip=skip, require=is_class)
    if not is_class:
        return functools.partial(obj, **kwargs)
    try:
        return obj(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from exc


def build(
    family: str,
    name: str,
    options: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
) -> Any:
    """Instantiates strategy ``name`` of ``family`` with ``options``, filled from ``info``.

    :func:`lookup` then :func:`instantiate`: ValueError for an unknown name (listing the
    available ones), an unknown option (listing the allowed ones) or a value the strategy
    rejects (its message, prefixed with the strategy's name).
    """
    obj = lookup(family, name)
    return instantiate(obj, options, info, what=f"{FAMILY_LABELS.get(family, family)} {name!r}")
