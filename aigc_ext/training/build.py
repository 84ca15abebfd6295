"""From a checked configuration to the objects a run trains with.

:func:`resolve` looks every component the configuration names up, once: the dataset and model
factories, the objective, the augmentations, the finetuner and the transfer strategy; it checks
that each option names a parameter of its factory, and builds nothing. Configuration
validation (:func:`aigc_ext.training.load_config`) is this dry run, and a run builds from the
:class:`Resolved` it returns: the dataset first (its ``info`` fills options the configuration
left out), then the model with its finetuner and transfer strategy, the objective and the
augmentations (:func:`build_data`, :func:`build_model`, :func:`build_strategy`), and the
optimiser (:func:`build_optimizer`). Values are checked by the factories when they are built;
every configuration mistake is a :class:`~aigc_ext.training.ConfigError` naming its section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aigc_ext.training.components import DataBundle
from aigc_ext.training.config import (
    ComponentConfig,
    ConfigError,
    RunConfig,
    TrainConfig,
    read_config,
)
from aigc_ext.training.schedule import WarmupCosine

__all__ = [
    "CONTEXT_ARGUMENTS",
    "Bound",
    "BuiltModel",
    "Optimisation",
    "Resolved",
    "build_data",
    "build_model",
    "build_optimizer",
    "build_plain_model",
    "build_strategy",
    "config_errors",
    "resolve",
    "split_weight_decay",
]


@dataclass(frozen=True)
class Bound:
    """One component of a configuration, looked up and with its options checked.

    ``section`` is where the configuration names it (``model``, ``augmentations.0``), ``label``
    how messages name it (``model 'gpt'``), ``factory`` the registered factory, class or
    function, and ``options`` the keyword arguments the configuration gives it. ``context``
    holds what the run supplies beside the options to a factory that declares the parameter
    (see :data:`CONTEXT_ARGUMENTS`).
    """

    section: str
    label: str
    factory: Callable[..., Any]
    options: dict[str, Any]
    context: dict[str, Any] = field(default_factory=dict)


CONTEXT_ARGUMENTS = {"data": ("model",), "model": ("objective",)}
"""Parameters the run fills, not the configuration: a dataset factory that takes ``model``
gets the model section (``{"name": ..., **options}``, e.g. to use the model's tokenizer), a
model factory that takes ``objective`` gets the objective's name (e.g. to choose its head)."""


@dataclass(frozen=True)
class Resolved:
    """Every component of ``config``, looked up once by :func:`resolve`."""

    config: TrainConfig
    model: Bound
    data: Bound
    objective: Bound
    augmentations: tuple[Bound, ...]
    finetune: Bound | None
    transfer: Bound | None


@dataclass
class BuiltModel:
    """The model a run trains (after its finetuner and transfer strategy's ``setup``), the
    finetuner (it saves the adapter of a model with adapters) and the transfer strategy (its
    ``param_groups`` and ``on_epoch_start`` shape the training)."""

    model: torch.nn.Module
    finetuner: Any | None
    transfer: Any | None


@dataclass
class Optimisation:
    """AdamW, its warm-up and cosine schedule, and the GradScaler (enabled for fp16 on CUDA)."""

    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


# --- resolving ---------------------------------------------------------------------------------


def _parameter_names(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # some callables have no signature
        return set()


def _factory(
    section: str,
    label: str,
    get: Callable[[str], Callable],
    comp: ComponentConfig,
    available: Mapping[str, Any],
    **how: Any,
) -> Bound:
    from aigc_ext.training import strategies

    names = CONTEXT_ARGUMENTS[section]
    try:
        factory = get(comp.name)
        what = f"{label} {comp.name!r}"
        how["exclude"] = (*how.get("exclude", ()), *names)
        strategies.call_options(factory, comp.options, what=what, **how)
    except ValueError as exc:
        raise ConfigError(f"[{section}] {exc}") from None
    context = {name: available[name] for name in names if name in _parameter_names(factory)}
    return Bound(section, what, factory, dict(comp.options), context)


def _strategy(section: str, family: str, comp: ComponentConfig) -> Bound:
    from aigc_ext.training import strategies

    try:
        obj = strategies.lookup(family, comp.name)
        what = f"{strategies.FAMILY_LABELS[family]} {comp.name!r}"
        strategies.check_options(obj, comp.options, what=what)
    except ValueError as exc:
        raise ConfigError(f"[{section}] {exc}") from None
    return Bound(section, what, obj, dict(comp.options))


def resolve(config: TrainConfig) -> Resolved:
    """Looks up every component ``config`` names and checks that each option names one of its
    factory's parameters; builds nothing.

    An unknown name (listing the available ones) or an unknown option (listing the allowed
    ones) is a :class:`ConfigError` such as ``[model] unknown model 'x'; available: ...``.
    """
    from aigc_ext.training import components

    model = _factory(
        "model",
        "model",
        components.get_model,
        config.model,
        {"objective": config.objective.name},
        skip=1,
    )
    data = _factory(
        "data",
        "dataset",
        components.get_dataset,
        config.data,
        {"model": config.model.to_dict()},
        exclude=("seed",),
    )
    objective = _strategy("objective", "objectives", config.objective)
    augmentations = tuple(
        _strategy(f"augmentations.{i}", "augmentations", a)
        for i, a in enumerate(config.augmentations)
    )
    finetune = transfer = None
    if config.finetune is not None:
        finetune = _strategy("finetune", "finetuners", config.finetune)
    if config.transfer is not None:
        transfer = _strategy("transfer", "transfer_strategies", config.transfer)
    return Resolved(config, model, data, objective, augmentations, finetune, transfer)


# --- building ----------------------------------------------------------------------------------


@contextlib.contextmanager
def config_errors(where: str) -> Iterator[None]:
    """ValueErrors raised while building a component are configuration errors."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{where} {exc}") from exc


def build_data(bound: Bound, seed: int) -> DataBundle:
    """Calls the dataset factory with ``seed`` (``run.seed``) and its options."""
    from aigc_ext.training import strategies

    with config_errors(f"[{bound.section}]"):
        if "seed" in bound.options:
            raise ValueError("option 'seed' is not allowed: the dataset gets run.seed")
        kwargs = strategies.call_options(
            bound.factory, bound.options, what=bound.label, exclude=("seed", *bound.context)
        )
        bundle = bound.factory(seed=seed, **kwargs, **bound.context)
    for attr in ("train", "eval", "collate", "info"):
        if not hasattr(bundle, attr):
            raise TypeError(
                f"{bound.label} must return a DataBundle (train, eval, collate, info), "
                f"got {type(bundle).__name__}"
            )
    return bundle


def build_strategy(bound: Bound, info: Mapping[str, Any]) -> Any:
    """The strategy (objective, augmentation, finetuner, transfer strategy) ``bound`` names,
    built with its options and the parameters ``info`` fills."""
    from aigc_ext.training import strategies

    with config_errors(f"[{bound.section}]"):
        return strategies.instantiate(bound.factory, bound.options, info, what=bound.label)


def build_model(resolved: Resolved, info: Mapping[str, Any]) -> BuiltModel:
    """The model factory called with the dataset's ``info`` and its options, then the
    finetuner applied and the transfer strategy's ``setup``, each checked to give a module."""
    from aigc_ext.training import strategies

    bound = resolved.model
    with config_errors(f"[{bound.section}]"):
        kwargs = strategies.call_options(
            bound.factory, bound.options, what=bound.label, skip=1, exclude=tuple(bound.context)
        )
        model = bound.factory(dict(info), **kwargs, **bound.context)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{bound.label} must return a torch.nn.Module, got {model!r}")
    finetuner = transfer = None
    if resolved.finetune is not None:
        finetuner = build_strategy(resolved.finetune, info)
        with config_errors("[finetune]"):  # e.g. LoRA target modules the model lacks
            model = finetuner(model)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{resolved.finetune.label} must return a module")
    if resolved.transfer is not None:
        transfer = build_strategy(resolved.transfer, info)
        with config_errors("[transfer]"):
            model = transfer.setup(model)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{resolved.transfer.label}.setup must return a module")
    return BuiltModel(model, finetuner, transfer)


def build_plain_model(resolved: Resolved, info: Mapping[str, Any]) -> torch.nn.Module:
    """The model of ``resolved`` (with its finetuner) to receive trained weights: built
    without ``init_from`` (the weights come afterwards) and without the transfer strategy's
    ``setup`` (which only chooses what trains)."""
    bound = resolved.model
    options = {k: v for k, v in bound.options.items() if k not in ("init_from", "init_optional")}
    plain = dataclasses.replace(
        resolved, model=dataclasses.replace(bound, options=options), transfer=None
    )
    return build_model(plain, info).model


def split_weight_decay(groups: Sequence[Mapping[str, Any]], weight_decay: float) -> list[dict]:
    """Each group split in two with the same learning rate: weight decay for matrices,
    none for biases and norm weights (1-D tensors). A group that sets weight_decay keeps it."""
    out: list[dict] = []
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(f"parameter group {i} must be a dict with 'params', got {group!r}")
        params = list(group["params"])
        base = {k: v for k, v in group.items() if k != "params"}
        name = str(base.pop("name", f"group{i}"))
        if "weight_decay" in base:
            out.append({**base, "params": params, "name": name})
            continue
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        if decay:
            out.append({**base, "params": decay, "weight_decay": weight_decay, "name": name})
        if no_decay:
            out.append(
                {**base, "params": no_decay, "weight_decay": 0.0, "name": f"{name}/no_decay"}
            )
    return out


def build_optimizer(
    built: BuiltModel, run: RunConfig, total_steps: int, device: torch.device
) -> Optimisation:
    """AdamW over the transfer strategy's parameter groups (or every trainable parameter),
    split by :func:`split_weight_decay`, with :class:`~aigc_ext.training.schedule.WarmupCosine`
    over ``total_steps`` and a GradScaler for fp16 on CUDA."""
    if built.transfer is not None:
        groups = built.transfer.param_groups(built.model, run.lr)
    else:
        trainable = [p for p in built.model.parameters() if p.requires_grad]
        if not trainable:
            raise RuntimeError("the model has no trainable parameters")
        groups = [{"params": trainable, "name": "all"}]
    groups = split_weight_decay(groups, run.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=run.lr, weight_decay=run.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(run.warmup_steps, total_steps, run.min_lr_ratio)
    )
    fp16 = run.precision == "fp16" and device.type == "cuda"
    return Optimisation(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=fp16))


def load_config(
    source: TrainConfig | Mapping[str, Any] | str | os.PathLike,
    *,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    check_names: bool = True,
) -> TrainConfig:
    """Reads and checks a training configuration (:func:`~aigc_ext.training.config.read_config`)
    and, with ``check_names``, does the dry run of the build: :func:`resolve` looks every name up
    (an unknown one lists the available ones) and checks that the options name parameters of
    their factories, building nothing. Raises :class:`ConfigError`."""
    config = read_config(source, overrides=overrides)
    if check_names:
        resolve(config)
    return config
