"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for runs with
``run.distributed = "fsdp"`` under ``torchrun``.

:func:`shard` gives every transformer block its own FSDP unit and the model the outer one:
each process keeps ``1/world_size`` of every parameter, gradient and optimiser state, and a
block's full parameters exist only while that block runs (forward and backward). The blocks
are the modules whose class a transformers model lists in ``_no_split_modules`` (``GPT2Block``,
``LlamaDecoderLayer``, ...), else the items of the model's largest ``nn.ModuleList`` of
identical modules. ``run.fsdp_param_dtype`` and ``run.fsdp_reduce_dtype`` make the
``MixedPrecisionPolicy``: the dtype the gathered parameters compute in and the one gradients
are reduced in, while the sharded parameters and the optimiser stay in their own dtype.

Checkpoints and the final model are gathered to rank 0 in the format a single process writes
(:mod:`aigc_ext.training.checkpoint`): :func:`full_states` collects the full weights and the
full optimiser state (every process takes part; rank 0 receives them, in CPU memory), and
:func:`load_model_state` / :func:`load_optimizer_state` shard full state again on resume. A
checkpoint is thus the same whether one process, DDP or FSDP wrote it, and resumes with any
number of processes. (``torch.distributed.checkpoint``'s own format would save without
gathering but stores pickled metadata beside sharded files, which the checks of a checkpoint
here do not accept.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "DTYPES",
    "FullState",
    "full_model",
    "full_states",
    "is_sharded",
    "load_model_state",
    "load_optimizer_state",
    "plain_model",
    "shard",
    "transformer_blocks",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FullState:
    """A model's full weights gathered to rank 0: ``tensors`` by name, each tied group stored
    once (under its first name in sorted order) with ``aliases`` mapping every other name of
    the group to it, as safetensors' ``save_model`` records them."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


# --- sharding ----------------------------------------------------------------------------------


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units of their own, in module order (see the module's
    description); empty when the model has neither ``_no_split_modules`` nor a list of
    identical modules."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    if names:
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if blocks:
            return blocks
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and any(True for _ in module[0].parameters()):
                best = list(module)
    return best


def shard(
    model: nn.Module,
    device: torch.device,
    *,
    param_dtype: str | None = None,
    reduce_dtype: str | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Applies ``fully_shard`` to each transformer block and then to ``model`` over all
    processes of the default group; the shards move to ``device``. Returns ``model`` (now an
    ``FSDPModule``, the same object)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[param_dtype] if param_dtype else None,
        reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None,
    )
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


# --- gathering to rank 0 -------------------------------------------------------------------------


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """The names of each parameter or buffer known under more than one name, sorted."""
    by_object: dict[int, list[str]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        by_object.setdefault(id(tensor), []).append(name)
    for name, tensor in model.named_buffers(remove_duplicate=False):
        by_object.setdefault(id(tensor), []).append(name)
    return [sorted(names) for names in by_object.values() if len(names) > 1]


def _gathered_weights(model: nn.Module) -> FullState | None:
    """The full weights on rank 0's CPU, tied groups stored once; None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if torch.distributed.get_rank() != 0:
        return None
    aliases: dict[str, str] = {}
    for names in _tied_groups(model):
        present = [n for n in names if n in weights]
        for name in present[1:]:
            aliases[name] = present[0]
            del weights[name]
    return FullState(dict(weights), aliases)


def full_states(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[FullState | None, dict[str, Any] | None]:
    """The full weights and the full optimiser state of a sharded run, on rank 0's CPU (None
    on the other processes). Every process must call it.

    The optimiser state is in the form ``optimizer.state_dict()`` has in a single process:
    per-parameter state under the parameter's index in the order of the parameter groups,
    ``params`` lists of indices, so a single process or another number of processes loads it.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    weights = _gathered_weights(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if weights is None:
        return None, None
    index: dict[str, int] = {}
    groups = []
    for group in optim["param_groups"]:
        ids = []
        for fqn in group["params"]:
            index[fqn] = len(index)
            ids.append(index[fqn])
        groups.append({**group, "params": ids})
    state = {index[fqn]: value for fqn, value in optim["state"].items()}
    return weights, {"state": state, "param_groups": groups}


def plain_model(weights: FullState, rebuild: Callable[[], nn.Module]) -> nn.Module:
    """A new, unsharded model from ``rebuild()`` (the same architecture) holding ``weights``
    (tied names filled in): what the outputs that need a module (``save_pretrained``, an
    adapter) are written from."""
    plain = rebuild()
    full = dict(weights.tensors)
    full.update({name: full[kept] for name, kept in weights.aliases.items()})
    plain.load_state_dict(full, strict=True)
    return plain


def full_model(model: nn.Module, rebuild: Callable[[], nn.Module]) -> nn.Module:
    """:func:`plain_model` of a sharded model's gathered weights on rank 0 (every process
    takes part in gathering them); the other processes get ``model`` back."""
    weights = _gathered_weights(model)
    return model if weights is None else plain_model(weights, rebuild)


# --- sharding full state again -------------------------------------------------------------------


def load_model_state(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Loads full weights (every process passes the same ``tensors``, as read from a
    checkpoint's ``model.safetensors``) into a sharded model: each process keeps its shard.
    Tied names stored once are filled in; a missing or unexpected name is a RuntimeError."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = dict(tensors)
    for names in _tied_groups(model):
        present = [n for n in names if n in full]
        if present:
            for name in names:
                full.setdefault(name, full[present[0]])
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]
) -> None:
    """Loads a full optimiser state in single-process form (indices, as :func:`full_states`
    and ``optimizer.state_dict()`` give it) into the optimiser of a sharded model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_groups = state_dict["param_groups"]
    saved = [list(g["params"]) for g in saved_groups]
    if [len(g) for g in saved] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(
            f"the saved optimizer has parameter groups of sizes {[len(g) for g in saved]}, "
            f"this one {[len(g['params']) for g in optimizer.param_groups]}"
        )
    position = {index: i for i, index in enumerate(i for g in saved for i in g)}
    state = {
        names[id(params[position[int(index)]])]: value
        for index, value in state_dict["state"].items()
    }
    groups = [
        {**saved_group, "params": [names[id(p)] for p in group["params"]]}
        for saved_group, group in zip(saved_groups, optimizer.param_groups, strict=True)
    ]
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )
