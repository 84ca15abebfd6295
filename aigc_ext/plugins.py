"""The plugin manager: the default plugins plus every installed ``aigc_ext`` entry point.

The default plugins are aigc_ext's own built-ins, modules named in :data:`DEFAULT_PLUGINS` and
loaded first, through the same hooks a third-party plugin implements. Registration hooks fill
the registries of :data:`aigc_ext.registries.FAMILIES`: the manager walks that table (family
-> hook, registry) and knows nothing of what the registries are for.

Plugins are loaded once, on first use (:func:`aigc_ext.backends`, :func:`get_registry`, the
``aigc-ext`` command), never at ``import aigc_ext``. Environment variables:

* ``AIGC_EXT_PLUGINS=a,b``: load only these third-party plugins, each named by its entry-point
  name or by the name of its distribution (what was pip-installed, compared as pip compares
  names: ``My_Plugin`` is ``my-plugin``); a name that matches no installed plugin is reported
  with the names that do;
* ``AIGC_EXT_NO_PLUGINS=1``: load no third-party plugin (the built-ins still load);
* ``AIGC_EXT_STRICT_PLUGINS=1``: a plugin that fails to load raises :class:`PluginError`
  instead of being reported with a :class:`PluginWarning` and skipped.

A plugin cannot take the process down while loading: whatever its import or its registration
hooks raise, ``SystemExit`` included (not ``KeyboardInterrupt``), is such a failure.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata

import pluggy

from aigc_ext import hookspecs
from aigc_ext._version import __version__
from aigc_ext.registries import FAMILIES, Registry, registry

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "PluginError",
    "PluginFailure",
    "PluginInfo",
    "PluginWarning",
    "add_plugin",
    "canonical_name",
    "failures",
    "get_plugins",
    "get_registry",
    "load",
    "pm",
    "remove_plugin",
]

ENTRY_POINT_GROUP = "aigc_ext"
# aigc_ext's built-in plugins, loaded by module name before any entry point.
DEFAULT_PLUGINS = (
    "aigc_ext.default_plugins.backends",
    "aigc_ext.default_plugins.strategies",
    "aigc_ext.default_plugins.training",
)


class PluginError(RuntimeError):
    """A plugin failed to load (strict mode), or was misused."""


class PluginWarning(UserWarning):
    """A plugin failed to load and was skipped."""


@dataclass
class PluginInfo:
    """One loaded plugin: where it comes from, the hooks it implements, what it registered."""

    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    entry_point: str | None = None  # its name in the ``aigc_ext`` group; None if not one
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)  # family -> names

    @property
    def source(self) -> str:
        """How registrations name this plugin (in errors and ``BackendInfo.source``)."""
        return self.distribution or self.name

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PluginFailure:
    name: str
    distribution: str | None
    error: str


pm = pluggy.PluginManager("aigc_ext")
pm.add_hookspecs(hookspecs)

_infos: dict[str, PluginInfo] = {}
_failures: list[PluginFailure] = []
_lock = threading.RLock()
_loaded = False
_loading = False


def _flag(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no")


def load() -> None:
    """Loads the plugins unless already done (thread-safe; re-entrant calls return at once)."""
    global _loaded, _loading
    if _loaded:
        return
    with _lock:
        if _loaded or _loading:
            return
        _loading = True
        try:
            _load()
            _loaded = True
        except BaseException:
            _reset_locked()
            raise
        finally:
            _loading = False


def _load() -> None:
    strict = _flag("AIGC_EXT_STRICT_PLUGINS")
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        # A broken built-in is a bug in aigc_ext itself: always raise.
        add_plugin(module, module_name, distribution="aigc_ext", version=__version__, builtin=True)
    builtin = [(name, "aigc_ext") for name in DEFAULT_PLUGINS]
    entry_points = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        version = dist.version if dist is not None else None
        if _is_own_distribution(dist_name):
            # aigc_ext's built-ins are its default plugins; an entry point of its own
            # distribution can only be left in the metadata of an older install.
            continue
        entry_points.append((ep, dist_name, version))
    if _flag("AIGC_EXT_NO_PLUGINS"):
        return
    wanted = os.environ.get("AIGC_EXT_PLUGINS", "").strip()
    only = [n.strip() for n in wanted.split(",") if n.strip()] if wanted else None
    for ep, dist_name, version in entry_points:
        if only is not None and not any(_names_plugin(n, ep.name, dist_name) for n in only):
            continue
        try:
            plugin = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a plugin must not end the process
            _fault(
                ep.name, dist_name, f"failed to import: {type(exc).__name__}: {exc}", strict, exc
            )
            continue
        add_plugin(
            plugin,
            ep.name,
            distribution=dist_name,
            version=version,
            strict=strict,
            entry_point=ep.name,
        )
    known = [(ep.name, dist_name) for ep, dist_name, _ in entry_points]
    for name in dict.fromkeys(only or ()):
        if not any(_names_plugin(name, *k) for k in known + builtin):
            _fault(name, None, _not_installed(known, builtin), strict)


def canonical_name(name: str) -> str:
    """A distribution name as pip compares it (PEP 503): ``My_Plugin.x`` -> ``my-plugin-x``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _names_plugin(wanted: str, entry_point: str, distribution: str | None) -> bool:
    """Whether ``wanted`` (from ``AIGC_EXT_PLUGINS``) is this entry point's or its
    distribution's name."""
    if wanted == entry_point:
        return True
    return distribution is not None and canonical_name(wanted) == canonical_name(distribution)


def _not_installed(
    known: list[tuple[str, str | None]], builtin: list[tuple[str, str | None]]
) -> str:
    """The report of a name in ``AIGC_EXT_PLUGINS`` that matches no plugin: the names that do."""

    def names(pairs):
        return ", ".join(
            f"{ep!r}" + (f" (distribution {canonical_name(dist)!r})" if dist else "")
            for ep, dist in pairs
        )

    text = (
        "is named in AIGC_EXT_PLUGINS but not installed (AIGC_EXT_PLUGINS takes entry-point or "
        "distribution names; installed plugins: " + (names(known) or "none")
    )
    if builtin:
        text += f"; built-in, always loaded: {names(builtin)}"
    return text + ")"


def _is_own_distribution(name: str | None) -> bool:
    return name is not None and canonical_name(name) == "aigc-ext"


def add_plugin(
    plugin: object,
    name: str | None = None,
    *,
    distribution: str | None = None,
    version: str | None = None,
    builtin: bool = False,
    strict: bool = True,
    entry_point: str | None = None,
) -> PluginInfo | None:
    """Registers ``plugin`` with :data:`pm` and runs its registration hooks.

    On a fault (invalid hook, unknown hook, an exception in a registration hook, a duplicate
    name; ``SystemExit`` too, but not ``KeyboardInterrupt``) everything the plugin registered is
    removed and the plugin is unregistered; then :class:`PluginError` is raised if ``strict``,
    else a :class:`PluginWarning` is shown and ``None`` returned. (An unknown hook only warns
    when not ``strict``: the plugin stays.) What a ``builtin`` plugin registers is marked so
    (:attr:`aigc_ext.registries.Entry.builtin`): the dispatcher trusts built-in backends.
    """
    with _lock:
        try:
            name = pm.register(plugin, name=name)
        except Exception as exc:
            _fault(name or repr(plugin), distribution, f"cannot be registered: {exc}", strict, exc)
            return None
        info = PluginInfo(name, distribution, version, builtin, entry_point)
        callers = pm.get_hookcallers(plugin) or []
        info.hooks = sorted(c.name for c in callers)
        try:
            unknown = [c.name for c in callers if not c.has_spec() and _own_impls(c, plugin)]
            if unknown:
                message = (
                    f"implements unknown hook(s) {', '.join(unknown)} "
                    "(misspelt? see aigc_ext.hookspecs)"
                )
                if strict:
                    raise PluginError(message)
                _fault(name, distribution, message, strict=False)
            for family, (hookname, family_registry) in FAMILIES.items():
                register = _register_callable(info, family, family_registry)
                for impl in _own_impls(getattr(pm.hook, hookname), plugin):
                    impl.function(*[{"register": register}[a] for a in impl.argnames])
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a plugin must not end the process
            _rollback(info)
            pm.unregister(name=name)
            _fault(name, distribution, f"failed: {type(exc).__name__}: {exc}", strict, exc)
            return None
        _infos[name] = info
        return info


def _own_impls(caller: pluggy.HookCaller, plugin: object) -> list[pluggy.HookImpl]:
    return [
        i
        for i in caller.get_hookimpls()
        if i.plugin is plugin and not i.optionalhook and not (i.wrapper or i.hookwrapper)
    ]


def _register_callable(info: PluginInfo, family: str, family_registry: Registry):
    """The ``register`` a plugin's hook of ``family`` receives: the family's registration form
    (see :mod:`aigc_ext.hookspecs`), the plugin as source, recorded for the rollback."""

    def register(*args, **kwargs):
        entry = family_registry.add(args, kwargs, source=info.source, builtin=info.builtin)
        info.registered.setdefault(family, []).append(entry.name)
        return entry

    register.__name__ = f"register_{family}"
    return register


def _rollback(info: PluginInfo) -> None:
    for family, names in info.registered.items():
        for n in names:
            FAMILIES[family].registry.unregister(n)
    info.registered.clear()


def remove_plugin(name: str) -> None:
    """Unregisters plugin ``name`` and everything it registered."""
    with _lock:
        info = _infos.pop(name, None)
        if info is not None:
            _rollback(info)
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)


def _fault(name, distribution, message, strict, exc=None) -> None:
    where = f"plugin {name!r}" + (f" (distribution {distribution})" if distribution else "")
    _failures.append(PluginFailure(name, distribution, message))
    text = f"aigc_ext: {where} {message}"
    if strict:
        raise PluginError(text) from exc
    warnings.warn((text + "; skipped") if exc is not None else text, PluginWarning, stacklevel=4)


def _reset_locked() -> None:
    global _loaded
    for name in list(_infos):
        remove_plugin(name)
    for _, plugin in list(pm.list_name_plugin()):
        pm.unregister(plugin)
    _failures.clear()
    _loaded = False


def _reset() -> None:
    """Forgets every plugin and what the plugins registered; the next use loads them again
    (for tests). What was registered directly (``register_backend``, ``register_model``) stays."""
    with _lock:
        _reset_locked()


def get_plugins(include_builtins: bool = False) -> list[PluginInfo]:
    """The loaded plugins (third-party only unless ``include_builtins``)."""
    load()
    return [i for i in _infos.values() if include_builtins or not i.builtin]


def failures() -> list[PluginFailure]:
    """Plugins that failed to load (or implement unknown hooks), in the order they were found."""
    load()
    return list(_failures)


def get_registry(family: str) -> Registry:
    """The registry of ``family`` (one of :data:`aigc_ext.registries.FAMILIES`: objectives,
    finetuners, augmentations, transfer_strategies, models, datasets, recipes,
    attention_backends), after loading the plugins."""
    found = registry(family)  # an unknown family is a KeyError listing the known ones
    load()
    return found
