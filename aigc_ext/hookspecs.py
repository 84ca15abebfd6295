"""Hook specifications: the functions a plugin may implement.

A plugin is a module (or any object) with functions decorated by :data:`hookimpl`::

    from aigc_ext import hookimpl

    @hookimpl
    def aigc_register_augmentations(register):
        register("flip", flip)

Registration hooks receive a ``register`` callable and are called once per plugin when the
plugins are loaded (on first use of :func:`aigc_ext.backends`, a registry or the CLI). Lifecycle
hooks (``aigc_on_*``) are called by a training run through :func:`aigc_ext.lifecycle.notify`.
"""

from __future__ import annotations

import pluggy

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("aigc_ext")
hookimpl = pluggy.HookimplMarker("aigc_ext")

# --- registration hooks -----------------------------------------------------------------------


@hookspec
def aigc_register_attention_backends(register):
    """Registers attention backends.

    Preferred: ``register(spec)`` with an :class:`aigc_ext.BackendSpec` (name, serve, devices,
    priority, description, unavailable_reason, unsupported_reason), whose ``serve(call)``
    receives the validated :class:`aigc_ext.validation.AttentionCall` (it carries the tensors
    and resolved options) and returns the output.

    Also accepted: ``register(name, fn, devices=("cpu",), *, priority=0, description="",
    unavailable_reason=None, unsupported_reason=None)``, the arguments of
    :func:`aigc_ext.register_backend`, with ``fn`` a function of the signature of
    ``torch.nn.functional.scaled_dot_product_attention`` (adapted once, at registration). The
    source is filled in with the plugin's name.
    """


@hookspec
def aigc_register_objectives(register):
    """Registers training objectives: ``register(name, objective, *, description="")``.

    A strategy of any family is registered either as a class, instantiated with the options of
    a run's configuration (``MaskedLM(mlm_probability=0.15)``), or as a function, called with
    them as keyword arguments. An objective instance has ``prepare(batch, *, generator) ->
    batch``, which turns a batch of raw examples (a dict of tensors, e.g. ``input_ids`` and
    ``attention_mask``) into model inputs and ``labels`` (masking, span corruption, shifting),
    and ``__call__(model, batch) -> loss``, a scalar tensor. It may also have
    ``eval_metrics(model, batch) -> {name: (sum, count)}`` for evaluation (e.g. accuracy).
    """


@hookspec
def aigc_register_finetuners(register):
    """Registers fine-tuning methods: ``register(name, finetuner, *, description="")``.

    A finetuner is a callable ``(model) -> model`` (after instantiation with its options, see
    :func:`aigc_register_objectives`) that prepares a pretrained model for fine-tuning (makes
    all parameters trainable, adds LoRA adapters, ...) and returns the model to train. A
    finetuner that trains an adapter apart from the base weights also has
    ``save_adapter(model, directory) -> directory``, which saves that adapter alone; a training
    run calls it for the final model (``<output_dir>/adapter``).
    """


@hookspec
def aigc_register_augmentations(register):
    """Registers data augmentations: ``register(name, augmentation, *, description="")``.

    An augmentation is a callable ``(batch, *, generator=None) -> batch``; ``generator`` is a
    ``torch.Generator`` to draw its randomness from, so that a seeded run is reproducible. A
    training run passes the batch as a dict of tensors (``input_ids``/``attention_mask`` for
    text, ``pixel_values``/``labels`` for images); the built-in augmentations also accept the
    bare tensor.
    """


@hookspec
def aigc_register_transfer_strategies(register):
    """Registers transfer-learning strategies: ``register(name, strategy, *, description="")``.

    A transfer strategy (after instantiation with its options) has ``setup(model) -> model``
    (freezes layers, replaces the head for a new number of labels), ``param_groups(model, lr)
    -> list[dict]`` (the optimizer's parameter groups, e.g. a learning rate per layer group)
    and ``on_epoch_start(model, epoch)`` (e.g. unfreezes one more layer group).
    """


@hookspec
def aigc_register_models(register):
    """Registers model factories: ``register(name, factory, *, description="")``.

    ``factory(info: dict, **options) -> torch.nn.Module``: ``info`` is what the dataset
    describes (``vocab_size``, ``num_labels``, ...), ``options`` the ``[model]`` options of a
    run's configuration (see docs/training.md).
    """


@hookspec
def aigc_register_datasets(register):
    """Registers dataset factories: ``register(name, factory, *, description="")``.

    ``factory(*, seed: int, **options) -> aigc_ext.training.DataBundle``.
    """


@hookspec
def aigc_register_recipes(register):
    """Registers recipes: ``register(name, recipe, *, description="")`` with ``recipe`` an
    :class:`aigc_ext.training.Recipe` (a complete configuration ``aigc-ext train --recipe name``
    runs)."""


# --- lifecycle hooks of a training run ----------------------------------------------------------
# ``state`` is a :class:`aigc_ext.lifecycle.RunState`; set ``state.should_stop`` or
# ``state.should_save`` to ask the run to stop or to save a checkpoint.


@hookspec
def aigc_on_train_begin(state):
    """Called once before the first step."""


@hookspec
def aigc_on_step_end(state):
    """Called after every optimisation step (``state.step`` is the number of steps done)."""


@hookspec
def aigc_on_evaluate(state, metrics):
    """Called after an evaluation with its ``metrics`` (a ``dict[str, float]``)."""


@hookspec
def aigc_on_save(state, path):
    """Called after a checkpoint was written to ``path``."""


@hookspec
def aigc_on_train_end(state):
    """Called once after the last step (also when a hook asked the run to stop)."""
