"""Transfer-learning strategies: which layers of a pretrained model train, and how fast.

A model is split into layer groups, bottom to top (:func:`layer_groups`): the embeddings, each
transformer block, the head. The strategies (family ``transfer_strategies``) act on them:

* ``"freeze-backbone"`` (:class:`FreezeBackbone`): only the head group trains.
* ``"gradual-unfreezing"`` (:class:`GradualUnfreezing`, ULMFiT): epoch 0 trains the head only;
  every later epoch unfreezes the next group down, until the whole model trains.
* ``"discriminative-lr"`` (:class:`DiscriminativeLR`, ULMFiT): everything trains; each group's
  learning rate is the one above it divided by ``factor`` (2.6), so the general features of the
  lower layers move less than the task-specific top.

Every strategy takes ``num_labels``: when set and different from the head's output size, the
head is replaced by a freshly initialised one (:func:`replace_head`) in ``setup``.

The strategies set ``requires_grad`` of the parameters they manage: every parameter of a plain
model; on a PEFT model (after the ``lora`` finetuner) only the adapter weights and
``modules_to_save`` copies, so the frozen base weights stay frozen whatever the order in which a
run applies its finetuner and its transfer strategy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

__all__ = [
    "HEAD_NAMES",
    "DiscriminativeLR",
    "FreezeBackbone",
    "GradualUnfreezing",
    "layer_groups",
    "register_all",
    "replace_head",
]

# A parameter outside the blocks whose qualified name has one of these components belongs to
# the head group (BERT's pooler included: it is trained by the next-sentence objective and
# feeds only the classifier, so it is task-specific, not part of the encoder).
HEAD_NAMES = frozenset(
    {
        "classifier",
        "head",
        "lm_head",
        "score",
        "fc",
        "pooler",
        "cls",
        "qa_outputs",
        "pre_classifier",
    }
)
# Attributes replace_head looks for, in this order.
_HEAD_ATTRS = ("classifier", "score", "head", "fc")


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """(the module whose structure to inspect, whether ``model`` is a PEFT model)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft comes with the train extra
        return model, False
    if isinstance(model, PeftModel):
        return model.get_base_model(), True
    return model, False


def _check_model(model: object, who: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The ModuleLists holding the transformer blocks (see :func:`layer_groups`)."""
    lists: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(n == "" or name.startswith(n + ".") for n, _ in lists):
            continue  # nested in a block list (e.g. T5's block.i.layer)
        if next(module.parameters(), None) is None:
            continue
        lists.append((name, module))
    if not lists:
        return []
    primary = max(lists, key=lambda item: len(item[1]))  # first of the longest
    by_name = dict(lists)
    parts = primary[0].split(".")
    for own, other in (("encoder", "decoder"), ("decoder", "encoder")):
        if own in parts:
            partner = ".".join(other if p == own else p for p in parts)
            if partner in by_name:
                pair = [primary, (partner, by_name[partner])]
                return pair if own == "encoder" else pair[::-1]
    return [primary]


def layer_groups(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """Splits the parameters of ``model`` into layer groups, bottom (input) to top (output).

    Returns ``[("embeddings", [...]), (<block name>, [...]) per block, ("head", [...])]``, i.e.
    ``number of blocks + 2`` groups, always in this shape (the embeddings or head group may be
    empty, e.g. a bare encoder without pooler has no head parameters). Every parameter appears in
    exactly one group; a parameter shared by several modules (GPT-2's ``lm_head`` tied to
    ``wte``) counts once, in the group of its first occurrence (there: the embeddings).

    Rules, in order of precedence:

    1. The blocks are the entries of the longest ``nn.ModuleList`` (ModuleLists nested inside
       another are ignored): BERT ``encoder.layer``, GPT-2 ``h``, Llama ``layers``, ViT
       ``blocks``. Encoder-decoder models (T5 ``encoder.block`` / ``decoder.block``, BART
       ``encoder.layers`` / ``decoder.layers``): when the list's path has an ``encoder``
       component and the same path with ``decoder`` is a ModuleList too (or vice versa), both
       count, the encoder's blocks below the decoder's, as data flows. Block groups are named by
       path (``transformer.h.0``).
    2. Other parameters with a path component in :data:`HEAD_NAMES` (``classifier``, ``head``,
       ``lm_head``, ``score``, ``fc``, ``pooler``, ``cls``, ...) go to the head group.
    3. The rest goes by registration order: parameters before the first block (embeddings,
       position embeddings, a ViT's class token) to the embeddings group, parameters after the
       last block (final layer norms) to the head group, and parameters between two block lists
       (an encoder's final norm, a decoder's own position embeddings) to the group of the last
       block before them.

    A PEFT model is inspected through its base model (its adapters sit inside the blocks).
    Raises ``ValueError`` when the model has no ModuleList of blocks.
    """
    model = _check_model(model, "layer_groups")
    base, _ = _unwrap(model)
    lists = _block_lists(base)
    if not lists:
        top = ", ".join(n for n, _ in base.named_children()) or "none"
        raise ValueError(
            f"layer_groups: {type(base).__name__} has no nn.ModuleList of blocks to split into "
            f"layer groups; its top-level modules are: {top}"
        )
    block_names: list[str] = []
    block_of: dict[int, int] = {}
    for list_name, blocks in lists:
        for i, block in enumerate(blocks):
            index = len(block_names)
            block_names.append(f"{list_name}.{i}" if list_name else str(i))
            for param in block.parameters():
                block_of.setdefault(id(param), index)
    named = list(base.named_parameters())  # deduplicated: tied weights once
    positions = [k for k, (_, p) in enumerate(named) if id(p) in block_of]
    first, last = positions[0], positions[-1]
    groups: list[list[nn.Parameter]] = [[] for _ in range(len(block_names) + 2)]
    current = None  # index of the last block seen
    for k, (name, param) in enumerate(named):
        if id(param) in block_of:
            current = block_of[id(param)]
            groups[1 + current].append(param)
        elif any(part in HEAD_NAMES for part in name.split(".")[:-1]):
            groups[-1].append(param)
        elif k < first:
            groups[0].append(param)
        elif k > last:
            groups[-1].append(param)
        else:
            assert current is not None
            groups[1 + current].append(param)
    names = ["embeddings", *block_names, "head"]
    return list(zip(names, groups, strict=True))


def _find_head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    """(owner, attribute, Linear) of the output layer of the model's classification head."""
    for attr in _HEAD_ATTRS:
        module = model._modules.get(attr)
        if module is None:
            continue
        if isinstance(module, nn.Linear):
            return model, attr, module
        # A head with several layers (RoBERTa's dense + out_proj): its last Linear.
        linears = [(n, m) for n, m in module.named_modules() if n and isinstance(m, nn.Linear)]
        if linears:
            path, linear = linears[-1]
            owner_path, _, leaf = path.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            return owner, leaf, linear
    return None


def _check_num_labels(num_labels: object, who: str) -> int:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"{who}: num_labels must be an integer >= 1, got {num_labels!r}")
    return num_labels


def replace_head(model: nn.Module, num_labels: int) -> nn.Module:
    """Replaces the output layer of the model's head by a fresh ``Linear(in, num_labels)``.

    The head is the first of ``model.classifier``, ``model.score`` (HF sequence classifiers),
    ``model.head``, ``model.fc`` (the project's own and torchvision-like models); when it is
    not itself a Linear, its last Linear is replaced (RoBERTa's ``classifier.out_proj``). The new
    layer keeps ``in_features``, bias, dtype and device; it is initialised like a transformers
    head (normal with ``config.initializer_range``, zero bias) when the model has such a config,
    else with PyTorch's default. ``model.num_labels`` and ``model.config.num_labels`` (and so
    its ``id2label``) are updated. Returns the model (modified in place).

    Call it before adding LoRA adapters: a PEFT model is refused (``ValueError``).
    """
    model = _check_model(model, "replace_head")
    num_labels = _check_num_labels(num_labels, "replace_head")
    if _unwrap(model)[1]:
        raise ValueError(
            "replace_head: the model has PEFT adapters; replace the head before applying the "
            "'lora' finetuner (or pass modules_to_save for the new head)"
        )
    found = _find_head(model)
    if found is None:
        top = ", ".join(f"{n} ({type(m).__name__})" for n, m in model.named_children())
        raise ValueError(
            f"replace_head: no classification head found on {type(model).__name__} (looked for "
            f"a Linear named {', '.join(_HEAD_ATTRS)}); its top-level modules are: "
            f"{top or 'none'}"
        )
    owner, attr, old = found
    weight = old.weight
    new = nn.Linear(
        old.in_features,
        num_labels,
        bias=old.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    config = getattr(model, "config", None)
    std = getattr(config, "initializer_range", None)
    if isinstance(std, (int, float)) and not isinstance(std, bool) and std > 0:
        nn.init.normal_(new.weight, mean=0.0, std=float(std))
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    setattr(owner, attr, new)
    if config is not None and hasattr(config, "num_labels"):
        config.num_labels = num_labels
    for name in ("num_labels", "num_classes"):
        value = getattr(model, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(model, name, num_labels)
    return model


def _managed(model: nn.Module) -> Callable[[str], bool]:
    """Which parameters (by name in the inspected module) a strategy may (un)freeze."""
    _, is_peft = _unwrap(model)
    if not is_peft:
        return lambda name: True
    return lambda name: "lora_" in name or ".modules_to_save." in name


class _TransferStrategy:
    """Shared machinery: optional head replacement, freezing by group, one param group each."""

    name = ""

    def __init__(self, *, num_labels: int | None = None) -> None:
        self.num_labels = None if num_labels is None else _check_num_labels(num_labels, self.name)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"

    # -- hooks for the subclasses -------------------------------------------------------------

    def _trainable(self, n_groups: int, epoch: int) -> list[bool]:
        """Per non-empty group (bottom -> top): trainable during ``epoch``?"""
        return [True] * n_groups

    def _lrs(self, n_groups: int, lr: float) -> list[float]:
        return [lr] * n_groups

    def _validate(self, model: nn.Module) -> None:
        """Raises ValueError when the strategy cannot apply to ``model`` (after the head swap)."""

    # -- protocol -------------------------------------------------------------------------------

    def _groups(self, model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
        return [(name, params) for name, params in layer_groups(model) if params]

    def _apply(self, model: nn.Module, epoch: int) -> None:
        groups = self._groups(model)
        flags = self._trainable(len(groups), epoch)
        base, _ = _unwrap(model)
        managed = _managed(model)
        allowed = {id(p) for n, p in base.named_parameters() if managed(n)}
        for (_, params), flag in zip(groups, flags, strict=True):
            for param in params:
                if id(param) in allowed:
                    param.requires_grad_(flag)

    def setup(self, model: nn.Module) -> nn.Module:
        """Replaces the head if ``num_labels`` differs from it, then sets what trains."""
        model = _check_model(model, self.name)
        if self.num_labels is not None:
            base, _ = _unwrap(model)
            found = _find_head(base)
            if found is None or found[2].out_features != self.num_labels:
                replace_head(model, self.num_labels)
        self._validate(model)
        self._apply(model, 0)
        return model

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """One optimizer group per non-empty layer group, bottom to top, with ALL parameters.

        Frozen parameters are included (they get no gradient, so the optimizer skips them) so
        that unfreezing later needs no new optimizer. Each dict has ``params``, ``lr``, ``name``.
        """
        model = _check_model(model, self.name)
        if (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not math.isfinite(lr)
            or lr <= 0
        ):
            raise ValueError(f"{self.name}: lr must be a finite number > 0, got {lr!r}")
        groups = self._groups(model)
        lrs = self._lrs(len(groups), float(lr))
        return [
            {"params": list(params), "lr": group_lr, "name": name}
            for (name, params), group_lr in zip(groups, lrs, strict=True)
        ]

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Called by the runner before every epoch (``epoch`` counts from 0)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"{self.name}: epoch must be an integer >= 0, got {epoch!r}")


def _check_factor(factor: object, who: str) -> float:
    if (
        isinstance(factor, bool)
        or not isinstance(factor, (int, float))
        or not math.isfinite(factor)
        or factor < 1
    ):
        raise ValueError(f"{who}: factor must be a finite number >= 1, got {factor!r}")
    return float(factor)


def _discriminative(n_groups: int, lr: float, factor: float) -> list[float]:
    # The top group gets lr, each one below it lr / factor**(its distance from the top).
    return [lr / factor ** (n_groups - 1 - i) for i in range(n_groups)]


class FreezeBackbone(_TransferStrategy):
    """Trains only the head group; the pretrained backbone stays frozen (a linear probe).

    Options: ``num_labels`` (replace the head when it differs).
    """

    name = "freeze-backbone"

    def _validate(self, model: nn.Module) -> None:
        if not layer_groups(model)[-1][1]:
            raise ValueError(
                f"freeze-backbone: {type(_unwrap(model)[0]).__name__} has no head parameters "
                "(nothing would train); use a model with a head or set num_labels on a "
                "classifier"
            )

    def _trainable(self, n_groups: int, epoch: int) -> list[bool]:
        return [False] * (n_groups - 1) + [True]


class GradualUnfreezing(_TransferStrategy):
    """ULMFiT's gradual unfreezing: one more layer group trains each epoch, from the top.

    Epoch ``e`` trains the top ``e + 1`` non-empty groups (epoch 0: the head only); once ``e + 1``
    reaches the number of groups the whole model trains. The state depends only on ``epoch``,
    so a resumed run gets it right. Options: ``num_labels``, ``discriminative`` (also apply the
    learning rates of :class:`DiscriminativeLR`), ``factor`` (2.6).
    """

    name = "gradual-unfreezing"

    def __init__(
        self, *, num_labels: int | None = None, discriminative: bool = False, factor: float = 2.6
    ) -> None:
        super().__init__(num_labels=num_labels)
        if not isinstance(discriminative, bool):
            raise ValueError(
                f"gradual-unfreezing: discriminative must be true or false, got {discriminative!r}"
            )
        self.discriminative = discriminative
        self.factor = _check_factor(factor, self.name)

    def _trainable(self, n_groups: int, epoch: int) -> list[bool]:
        unfrozen = min(epoch + 1, n_groups)
        return [i >= n_groups - unfrozen for i in range(n_groups)]

    def _lrs(self, n_groups: int, lr: float) -> list[float]:
        if self.discriminative:
            return _discriminative(n_groups, lr, self.factor)
        return super()._lrs(n_groups, lr)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        super().on_epoch_start(model, epoch)
        self._apply(model, epoch)


class DiscriminativeLR(_TransferStrategy):
    """ULMFiT's discriminative fine-tuning: all groups train, lower groups more slowly.

    With ``n`` non-empty groups, group ``i`` (0 = embeddings) gets ``lr / factor**(n - 1 - i)``:
    the head gets ``lr``, the block below ``lr / 2.6``, and so on. Options: ``num_labels``,
    ``factor`` (2.6).
    """

    name = "discriminative-lr"

    def __init__(self, *, num_labels: int | None = None, factor: float = 2.6) -> None:
        super().__init__(num_labels=num_labels)
        self.factor = _check_factor(factor, self.name)

    def _lrs(self, n_groups: int, lr: float) -> list[float]:
        return _discriminative(n_groups, lr, self.factor)


def register_all(register) -> None:
    """Registers this module's transfer strategies."""
    register(
        "freeze-backbone",
        FreezeBackbone,
        description="Train only the head; the pretrained backbone stays frozen (num_labels).",
    )
    register(
        "gradual-unfreezing",
        GradualUnfreezing,
        description=(
            "ULMFiT gradual unfreezing: head only at epoch 0, one more layer group from the top "
            "each epoch (num_labels, discriminative, factor)."
        ),
    )
    register(
        "discriminative-lr",
        DiscriminativeLR,
        description=(
            "ULMFiT discriminative learning rates: each lower layer group's lr divided by "
            "factor (2.6) (num_labels, factor)."
        ),
    )
