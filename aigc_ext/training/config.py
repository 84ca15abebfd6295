"""Training configuration: read a TOML file or a dict, start from a recipe, apply overrides, check.

A configuration has these sections (see docs/training.md for every key)::

    recipe = "clm-pretrain"          # optional: start from this recipe's configuration
    [run]                            # the loop itself: steps, batch, optimiser, precision, ...
    [model]       name = "..."       # + the model factory's options
    [data]        name = "..."       # + the dataset factory's options
    [objective]   name = "..."       # + the objective's options
    [[augmentations]] name = "..."   # zero or more, applied in order
    [finetune]    name = "..."       # optional
    [transfer]    name = "..."       # optional

A component section holds its options either beside ``name`` or in an ``options`` table; both
spellings mean the same. Every mistake is a :class:`ConfigError` (a ``ValueError``) that names
the key, the value and what is allowed, so the command line can report it without a traceback.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

__all__ = [
    "DISTRIBUTED",
    "PRECISIONS",
    "SECTIONS",
    "ComponentConfig",
    "ConfigError",
    "RunConfig",
    "TrainConfig",
    "parse_override",
    "read_config",
]

PRECISIONS = ("fp32", "bf16", "fp16")
SAVE_HF = ("final", "checkpoints", "off")  # RUN/hf at the end; also in each checkpoint; never
DISTRIBUTED = ("ddp", "fsdp")
COMPONENT_SECTIONS = ("model", "data", "objective", "finetune", "transfer")
REQUIRED_SECTIONS = ("model", "data", "objective")
SECTIONS = ("recipe", "run", *COMPONENT_SECTIONS, "augmentations")


class ConfigError(ValueError):
    """A configuration is wrong: unknown key, bad value, unknown name, unreadable file."""


@dataclass
class RunConfig:
    """The ``[run]`` section: how the training loop runs.

    ``batch_size`` is per process (per device) and per micro-batch: one optimiser step sees
    ``batch_size * grad_accum * world_size`` examples. For the optional keys, ``None`` (or 0, since
    TOML has no null) means: ``max_steps`` - derived from ``epochs``; ``eval_every`` /
    ``save_every`` - only at the end; ``clip_grad_norm`` - no clipping. ``None`` (absent) means:
    ``eval_batch_size`` - ``batch_size`` (0 is refused: it is no batch size);
    ``output_dir`` - ``runs/<recipe or model name>``.
    """

    seed: int = 0
    output_dir: str | None = None
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    clip_grad_norm: float | None = 1.0
    precision: str = "fp32"
    # bf16 on a CPU without bf16 matmul hardware trains in fp32 (with a warning) unless this is
    # set: torch's bf16 matmuls there run at well under 1 GFLOP/s.
    force_precision: bool = False
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 1
    device: str = "auto"
    # RUN/hf: the model (a transformers one) and its tokenizer by save_pretrained.
    save_hf: str = "final"
    merge_lora: bool = False
    # Under torchrun: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 fully_shard); the
    # FSDP mixed-precision policy: the dtype parameters compute in and gradients are reduced
    # in (None: the parameters' own), and whether blocks free their gathered weights after
    # the forward pass.
    distributed: str = "ddp"
    fsdp_param_dtype: str | None = None
    fsdp_reduce_dtype: str | None = None
    fsdp_reshard_after_forward: bool = True


@dataclass
class ComponentConfig:
    """A named component (model, dataset, strategy) and the options it is built with."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **copy.deepcopy(self.options)}


@dataclass
class TrainConfig:
    """A complete, checked training configuration."""

    run: RunConfig
    model: ComponentConfig
    data: ComponentConfig
    objective: ComponentConfig
    augmentations: list[ComponentConfig] = field(default_factory=list)
    finetune: ComponentConfig | None = None
    transfer: ComponentConfig | None = None
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data (what ``config.json`` holds); loads back unchanged."""
        out: dict[str, Any] = {}
        if self.recipe is not None:
            out["recipe"] = self.recipe
        out["run"] = asdict(self.run)
        for name in ("model", "data", "objective"):
            out[name] = getattr(self, name).to_dict()
        out["augmentations"] = [a.to_dict() for a in self.augmentations]
        for name in ("finetune", "transfer"):
            section = getattr(self, name)
            if section is not None:
                out[name] = section.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=repr)

    def hash(self) -> str:
        """A short digest of the configuration, stored in checkpoints to notice changes."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the [run] keys ----------------------------------------------------------------------------

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_INT_LIMIT = 1 << 63


def _rule(kind: str, test=None, allowed: str = "", zero_is_none: bool = False, optional=False):
    return {
        "kind": kind,
        "test": test,
        "allowed": allowed,
        "zero_is_none": zero_is_none,
        "optional": optional or zero_is_none,
    }


_RUN_RULES: dict[str, dict] = {
    "seed": _rule("int", lambda v: v >= 0, ">= 0"),
    "output_dir": _rule("path", optional=True),
    "max_steps": _rule("int", lambda v: v >= 0, ">= 1 (0 or absent: from epochs)", True),
    "epochs": _rule("int", lambda v: v >= 1, ">= 1"),
    "batch_size": _rule("int", lambda v: v >= 1, ">= 1"),
    "eval_batch_size": _rule("int", lambda v: v >= 1, ">= 1 (absent: batch_size)", optional=True),
    "grad_accum": _rule("int", lambda v: v >= 1, ">= 1"),
    "lr": _rule("float", lambda v: v > 0, "> 0"),
    "weight_decay": _rule("float", lambda v: v >= 0, ">= 0"),
    "warmup_steps": _rule("int", lambda v: v >= 0, ">= 0"),
    "min_lr_ratio": _rule("float", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "clip_grad_norm": _rule("float", lambda v: v >= 0, "> 0 (0 or absent: no clipping)", True),
    "precision": _rule("choice", lambda v: v in PRECISIONS, ", ".join(PRECISIONS)),
    "force_precision": _rule("bool", allowed="true or false"),
    "eval_every": _rule("int", lambda v: v >= 0, ">= 1 (0 or absent: only at the end)", True),
    "save_every": _rule("int", lambda v: v >= 0, ">= 1 (0 or absent: only at the end)", True),
    "keep_checkpoints": _rule("int", lambda v: v >= 1, ">= 1"),
    "log_every": _rule("int", lambda v: v >= 1, ">= 1"),
    "device": _rule("choice", lambda v: bool(_DEVICE_RE.match(v)), "auto, cpu, cuda, cuda:N"),
    "save_hf": _rule("choice", lambda v: v in SAVE_HF, ", ".join(SAVE_HF)),
    "merge_lora": _rule("bool", allowed="true or false"),
    "distributed": _rule("choice", lambda v: v in DISTRIBUTED, ", ".join(DISTRIBUTED)),
    "fsdp_param_dtype": _rule(
        "choice", lambda v: v in PRECISIONS, ", ".join(PRECISIONS), optional=True
    ),
    "fsdp_reduce_dtype": _rule(
        "choice", lambda v: v in PRECISIONS, ", ".join(PRECISIONS), optional=True
    ),
    "fsdp_reshard_after_forward": _rule("bool", allowed="true or false"),
}
assert set(_RUN_RULES) == {f.name for f in fields(RunConfig)}


def _check_run_value(key: str, value: Any) -> Any:
    rule = _RUN_RULES[key]
    where = f"run.{key}"
    if value is None:
        if rule["optional"]:
            return None
        raise ConfigError(f"{where} must be set ({rule['allowed'] or rule['kind']}), got None")
    kind = rule["kind"]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer {rule['allowed']}, got {value!r}")
        if not -_INT_LIMIT <= value < _INT_LIMIT:  # torch, NumPy and TOML take 64-bit integers
            raise ConfigError(
                f"{where} must be an integer {rule['allowed']} that fits in 64 bits, "
                f"got one of {value.bit_length()} bits"
            )
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number {rule['allowed']}, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(
                f"{where} must be a finite number {rule['allowed']}, got an integer of "
                f"{value.bit_length()} bits, too large for a float"
            ) from None
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number {rule['allowed']}, got {value!r}")
    elif kind == "path":
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ConfigError(f"{where} must be a non-empty path string, got {value!r}")
        return str(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    elif kind == "choice" and not isinstance(value, str):
        raise ConfigError(f"{where} must be one of {rule['allowed']}, got {value!r}")
    if rule["test"] is not None and not rule["test"](value):
        allowed = rule["allowed"]
        prefix = "one of " if kind == "choice" else ""
        raise ConfigError(f"{where} must be {prefix}{allowed}, got {value!r}")
    if rule["zero_is_none"] and value == 0:
        return None
    return value


def _check_run(section: Any) -> RunConfig:
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"[run] must be a table of keys, got {type(section).__name__}")
    unknown = sorted(set(section) - set(_RUN_RULES))
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in [run]; allowed keys: {', '.join(sorted(_RUN_RULES))}"
        )
    return RunConfig(**{k: _check_run_value(k, v) for k, v in section.items()})


# --- component sections ------------------------------------------------------------------------


def _flatten_component(section: str, value: Any) -> dict[str, Any]:
    """``{"name": n, "options": {...}, ...}`` -> ``{"name": n, ...}`` (one spelling)."""
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"[{section}] must be a table with a 'name' key and options, "
            f"got {type(value).__name__} {value!r}"
        )
    out = {k: copy.deepcopy(v) for k, v in value.items() if k != "options"}
    options = value.get("options")
    if options is not None:
        if not isinstance(options, Mapping):
            raise ConfigError(f"{section}.options must be a table, got {options!r}")
        for key, v in options.items():
            if key in out:
                raise ConfigError(
                    f"option {key!r} of [{section}] is given twice (beside 'name' and in 'options')"
                )
            out[key] = copy.deepcopy(v)
    return out


def _component(section: str, value: Mapping[str, Any]) -> ComponentConfig:
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"[{section}] needs a 'name' (a non-empty string), got {name!r}")
    return ComponentConfig(name, {k: v for k, v in value.items() if k != "name"})


def _flatten(raw: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """Checks the top-level layout and brings component sections to the flat spelling."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origin}: a configuration must be a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{origin}: unknown section {unknown[0]!r}; allowed sections: {', '.join(SECTIONS)}"
        )
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in COMPONENT_SECTIONS:
            out[key] = _flatten_component(key, value)
        elif key == "augmentations":
            if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
                raise ConfigError(
                    f"augmentations must be a list of tables ([[augmentations]] in TOML), "
                    f"got {value!r}"
                )
            out[key] = [_flatten_component(f"augmentations.{i}", v) for i, v in enumerate(value)]
        elif key == "recipe":
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"recipe must be a recipe name (a string), got {value!r}")
            out[key] = value
        else:  # run
            if not isinstance(value, Mapping):
                raise ConfigError(f"[run] must be a table of keys, got {value!r}")
            out[key] = dict(value)
    return out


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_configs(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A file's values over a recipe's: tables merge key by key, lists are replaced, and a
    component section whose ``name`` changes is replaced whole (its old options would not fit)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if key in COMPONENT_SECTIONS and isinstance(out.get(key), dict):
            if "name" in value and value["name"] != out[key].get("name"):
                out[key] = copy.deepcopy(value)
            else:
                out[key] = _deep_merge(out[key], value)
        elif key == "run" and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- overrides ---------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """``"run.lr=1e-3"`` -> ``("run.lr", 0.001)``.

    The value is read as a TOML value (``3``, ``1e-3``, ``true``, ``"text"``, ``[1, 2]``,
    ``{ p = 0.5 }``); anything that is not valid TOML is taken as a plain string, so
    ``run.device=cuda`` works without quotes.
    """
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"an override must look like KEY=VALUE (e.g. run.lr=1e-3), got {text!r}")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: the key must be dotted names like run.lr")
    value = value.strip()
    if tomllib is not None:
        try:
            return key, tomllib.loads(f"value = {value}")["value"]
        except tomllib.TOMLDecodeError:
            pass
        except RecursionError:
            raise ConfigError(
                f"override {key!r}: the value's arrays or tables are nested too deeply to read"
            ) from None
    return key, value


def _apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    head = parts[0]
    if head not in SECTIONS:
        raise ConfigError(
            f"override {key!r}: unknown section {head!r}; allowed sections: {', '.join(SECTIONS)}"
        )
    if head in COMPONENT_SECTIONS and len(parts) >= 3 and parts[1] == "options":
        parts = [head, *parts[2:]]
    if len(parts) == 1:
        if head in COMPONENT_SECTIONS:
            value = _flatten_component(head, value)
        raw[head] = copy.deepcopy(value)
        return
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt_is_index = parts[i + 1].isdigit()
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {key!r}: {'.'.join(parts[: i + 1])} is not an existing list "
                    f"item (the list has {len(node)})"
                )
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            if nxt_is_index:
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a list")
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(
                f"override {key!r}: {'.'.join(parts[: i + 1])} is a value, not a table"
            )
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {key!r}: no list item {last!r} (the list has {len(node)})")
        node[int(last)] = copy.deepcopy(value)
    else:
        node[last] = copy.deepcopy(value)


def _normalise_overrides(
    overrides: Sequence[str] | Mapping[str, Any] | None,
) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    if isinstance(overrides, str):
        raise ConfigError(
            f"overrides must be a list of KEY=VALUE strings, got the string {overrides!r}"
        )
    return [parse_override(o) for o in overrides]


# --- loading -----------------------------------------------------------------------------------


MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: far above any configuration, far below a mistaken path


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _read_bytes(path: Path) -> bytes:
    """The bytes of a configuration file, refused unless it is a regular file of at most
    :data:`MAX_CONFIG_BYTES`: checked before reading, since a device (``/dev/zero``) would be
    read forever and a named pipe would block."""
    where = f"configuration file {str(path)!r}"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{where} not found") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{where} is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{where} is {_file_kind(info.st_mode)}, not a regular file")
    too_big = f"{where} is larger than {MAX_CONFIG_BYTES} bytes (1 MiB); is it a configuration?"
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(too_big)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # it may have grown since the stat
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(too_big)
    return data


def _read_file(path: Path) -> dict[str, Any]:
    """A TOML file, or a JSON one (``.json``, e.g. a run's ``config.json``).

    Every way the file can be unusable is a :class:`ConfigError` naming it: missing, not a
    regular file, too large, not UTF-8 text, not valid TOML/JSON, nested too deeply to parse.
    """
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "a configuration is a TOML or JSON text file"
        ) from None
    is_json = path.suffix.lower() == ".json"
    if not is_json and tomllib is None:  # pragma: no cover
        raise ConfigError("reading TOML needs Python >= 3.11 or the package tomli")
    try:
        return json.loads(text) if is_json else tomllib.loads(text)
    except RecursionError:
        raise ConfigError(
            f"{path}: arrays or tables nested too deeply to read ({'JSON' if is_json else 'TOML'})"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def read_config(
    source: TrainConfig | Mapping[str, Any] | str | os.PathLike,
    *,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Reads and checks a training configuration, without looking its names up.

    ``source`` is a TOML file (or a JSON file with the same layout, such as the ``config.json``
    a run writes), a dict, or a :class:`TrainConfig`.
    ``recipe = "NAME"`` at the top level starts from that recipe's configuration, which the
    source's values update. ``overrides`` (``["run.lr=1e-3", ...]`` or ``{"run.lr": 1e-3}``)
    come last. :func:`aigc_ext.training.build.load_config` adds the check that the model,
    dataset and strategies named exist and take the options given. Raises :class:`ConfigError`.
    """
    if isinstance(source, TrainConfig):
        raw, origin = source.to_dict(), "configuration"
    elif isinstance(source, Mapping):
        raw, origin = copy.deepcopy(dict(source)), "configuration"
    elif isinstance(source, (str, os.PathLike)):
        raw, origin = _read_file(Path(source)), str(source)
    else:
        raise TypeError(
            f"config must be a path, a dict or a TrainConfig, got {type(source).__name__}"
        )
    raw = _flatten(raw, origin)
    pairs = _normalise_overrides(overrides)
    for key, value in pairs:  # a recipe chosen by override decides the base
        if key == "recipe":
            raw["recipe"] = value
    recipe = raw.get("recipe")
    if recipe is not None:
        if not isinstance(recipe, str) or not recipe:
            raise ConfigError(f"recipe must be a recipe name (a string), got {recipe!r}")
        from aigc_ext.training import components

        try:
            base = components.get_recipe(recipe).config
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        base = _flatten({k: v for k, v in base.items() if k != "recipe"}, f"recipe {recipe!r}")
        raw = _merge_configs(base, raw)
    for key, value in pairs:
        if key != "recipe":
            _apply_override(raw, key, value)
    raw = _flatten(raw, origin)
    return _build(raw)


def _build(raw: dict[str, Any]) -> TrainConfig:
    for section in REQUIRED_SECTIONS:
        if raw.get(section) is None:
            raise ConfigError(
                f"the configuration has no [{section}] section; it needs [model], [data] and "
                f"[objective] (or recipe = NAME)"
            )
    run = _check_run(raw.get("run"))
    config = TrainConfig(
        run=run,
        model=_component("model", raw["model"]),
        data=_component("data", raw["data"]),
        objective=_component("objective", raw["objective"]),
        augmentations=[
            _component(f"augmentations.{i}", a) for i, a in enumerate(raw.get("augmentations", []))
        ],
        finetune=_component("finetune", raw["finetune"]) if raw.get("finetune") else None,
        transfer=_component("transfer", raw["transfer"]) if raw.get("transfer") else None,
        recipe=raw.get("recipe"),
    )
    if run.output_dir is None:
        run.output_dir = str(Path("runs") / (config.recipe or config.model.name))
    return config
