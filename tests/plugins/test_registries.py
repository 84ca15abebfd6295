"""The registry floor: one Registry class for every family, one table the plugin manager walks,
and the training tables (models, datasets, recipes) filled through hooks like the others."""

from __future__ import annotations

import pytest
import torch

from aigc_ext import dispatch, hookimpl, hookspecs, plugins, registries
from aigc_ext.registries import FAMILIES, Registry
from aigc_ext.testing import register_plugin
from aigc_ext.training import components


def test_every_family_has_a_hook_spec_and_a_registry():
    hook_names = {name for name in dir(hookspecs) if name.startswith("aigc_register_")}
    assert {family.hook for family in FAMILIES.values()} == hook_names
    for name, family in FAMILIES.items():
        assert isinstance(family.registry, Registry) and family.registry.family == name
        assert plugins.get_registry(name) is family.registry is registries.registry(name)
    with pytest.raises(KeyError, match=r"unknown plugin family 'colours'; known: .*recipes"):
        registries.registry("colours")


def test_backends_and_training_tables_are_registries_of_the_floor():
    assert dispatch._registry is registries.registry("attention_backends")
    assert components.MODELS is plugins.get_registry("models")
    assert components.DATASETS is plugins.get_registry("datasets")
    assert components.RECIPES is plugins.get_registry("recipes")


def test_registry_register_lookup_and_messages():
    reg = Registry("widgets")
    entry = reg.register("a", len, description="counts", source="here")
    assert (entry.name, entry.obj, entry.source, entry.description) == ("a", len, "here", "counts")
    assert reg.get("a") is len and reg["a"] is len and reg.entry("a") is entry
    assert "a" in reg and len(reg) == 1 and list(reg) == ["a"] and reg
    with pytest.raises(ValueError, match="widget 'a' is registered twice: by here and by there"):
        reg.register("a", abs, source="there")
    with pytest.raises(KeyError, match="unknown widget 'b'; registered: a"):
        reg.get("b")
    assert reg.get("b", None) is None
    with pytest.raises(TypeError, match="widgets: 'c' must be callable, got int"):
        reg.register("c", 3)
    with pytest.raises(ValueError, match="a name must be a non-empty string"):
        reg.register("", len)


def test_registry_mapping_interface_replaces_and_removes():
    reg = Registry("tables", callables=False)
    reg["x"] = 1
    reg["x"] = 2  # an assignment replaces, as in a dict
    assert reg["x"] == 2 and reg.entry("x").source == ""
    assert reg.pop("x") == 2 and reg.pop("x", "gone") == "gone"
    reg["y"] = 3
    del reg["y"]
    with pytest.raises(KeyError, match="unknown table 'y'"):
        del reg["y"]
    assert not reg and len(reg) == 0


def test_registry_kind_and_listeners():
    reg = Registry("numbers", callables=False, kind=int)
    seen = []
    reg.subscribe(lambda r: seen.append(r.names()))
    reg.register("one", 1)
    reg.unregister("one")
    reg.unregister("one")  # not registered: no change, no call
    assert seen == [[], ["one"], []]
    with pytest.raises(TypeError, match="numbers: 'half' must be a int, got float"):
        reg.register("half", 0.5)


def _tiny_model(info, *, width=4):
    """A tiny linear model."""
    return torch.nn.Linear(width, width)


def _tiny_data(*, seed):
    """A dataset that is never built here."""
    raise NotImplementedError


class TrainingPlugin:
    @hookimpl
    def aigc_register_models(self, register):
        register("reg-test-model", _tiny_model, description="tiny")

    @hookimpl
    def aigc_register_datasets(self, register):
        register("reg-test-data", _tiny_data)

    @hookimpl
    def aigc_register_recipes(self, register):
        recipe = components.Recipe("reg-test-recipe", "a test recipe", {"model": {}})
        register("reg-test-recipe", recipe, description=recipe.description)


def test_a_plugin_registers_models_datasets_and_recipes_through_hooks():
    with register_plugin(TrainingPlugin(), name="training-plugin") as info:
        assert info.registered == {
            "models": ["reg-test-model"],
            "datasets": ["reg-test-data"],
            "recipes": ["reg-test-recipe"],
        }
        assert components.get_model("reg-test-model") is _tiny_model
        assert components.get_dataset("reg-test-data") is _tiny_data
        assert components.get_recipe("reg-test-recipe").description == "a test recipe"
        assert components.MODELS.entry("reg-test-model").source == "training-plugin"
    for name, table in (
        ("reg-test-model", components.MODELS),
        ("reg-test-recipe", components.RECIPES),
    ):
        assert name not in table
    with pytest.raises(ValueError, match=r"unknown model 'reg-test-model'; available: .*gpt"):
        components.get_model("reg-test-model")


def test_builtin_training_names_come_from_the_default_plugin():
    plugins.load()
    entry = components.MODELS.entry("gpt")
    assert entry.builtin and entry.source == "aigc_ext"
    assert components.RECIPES.entry("clm-pretrain").builtin
    (info,) = [i for i in plugins.get_plugins(include_builtins=True) if "models" in i.registered]
    assert info.name == "aigc_ext.default_plugins.training" and info.builtin


def test_register_model_decorator_registers_directly_and_survives_a_plugin_reload():
    @components.register_model("reg-test-direct")
    def factory(info):
        return torch.nn.Identity()

    try:
        assert components.MODELS.entry("reg-test-direct").source == __name__
        plugins._reset()  # forgets what plugins registered, not what was registered directly
        assert "reg-test-direct" in components.MODELS
        assert components.get_model("gpt") is not None  # the built-ins load again
        with pytest.raises(ValueError, match="model 'reg-test-direct' is registered twice"):
            components.register_model("reg-test-direct")(factory)
    finally:
        components.MODELS.unregister("reg-test-direct")
