"""The resolve step between a configuration and a run: every name is looked up once, and
configuration validation is the same step as a dry run that builds nothing."""

from __future__ import annotations

from collections import Counter

import pytest
from test_training_runner import (
    AUGMENTATION,
    DATA,
    MODEL,
    OBJECTIVE,
    NextToken,
    TokenNoise,
    base_config,
    standins,
)

from aigc_ext.training import build, components, load_config, strategies, train
from aigc_ext.training.config import ConfigError


@pytest.fixture
def registered():
    with standins():
        yield


@pytest.fixture
def lookups(monkeypatch):
    """Counts the look-ups of models, datasets and strategies by name, and the calls of the
    stand-in model and dataset factories."""
    counts: Counter = Counter()
    with standins():
        model, data = components.MODELS[MODEL], components.DATASETS[DATA]

        def counted(kind, fn):
            def wrapper(*args, **kwargs):
                counts[kind] += 1
                return fn(*args, **kwargs)

            return wrapper

        monkeypatch.setitem(components.MODELS, MODEL, counted("model built", model))
        monkeypatch.setitem(components.DATASETS, DATA, counted("data built", data))
        get_model, get_dataset, lookup = (
            components.get_model,
            components.get_dataset,
            strategies.lookup,
        )
        monkeypatch.setattr(components, "get_model", lambda n: counted(f"model {n}", get_model)(n))
        monkeypatch.setattr(
            components, "get_dataset", lambda n: counted(f"data {n}", get_dataset)(n)
        )
        monkeypatch.setattr(strategies, "lookup", lambda f, n: counted(n, lookup)(f, n))
        yield counts


def test_a_run_looks_every_name_up_once(lookups, tmp_path):
    result = train(base_config(tmp_path / "run", max_steps=1))
    assert result.step == 1
    assert lookups == Counter(
        {
            f"model {MODEL}": 1,
            f"data {DATA}": 1,
            OBJECTIVE: 1,
            AUGMENTATION: 1,
            "model built": 1,
            "data built": 1,
        }
    )


def test_validation_is_the_resolve_step_and_builds_nothing(lookups, tmp_path):
    cfg = load_config(base_config(tmp_path / "run"))
    assert lookups == Counter(
        {f"model {MODEL}": 1, f"data {DATA}": 1, OBJECTIVE: 1, AUGMENTATION: 1}
    )
    resolved = build.resolve(cfg)
    assert resolved.config is cfg
    assert (
        resolved.objective.factory is NextToken
        and resolved.objective.label == f"objective {OBJECTIVE!r}"
    )
    assert [a.factory for a in resolved.augmentations] == [TokenNoise]
    assert resolved.augmentations[0].section == "augmentations.0"
    assert resolved.augmentations[0].options == {"p": 0.2}
    assert resolved.model.options == {"dropout": 0.1} and resolved.model.section == "model"
    assert resolved.finetune is None and resolved.transfer is None
    assert lookups["model built"] == lookups["data built"] == 0
    # values are the factories' to check, when they are built: the dry run accepts this one
    bad = base_config(tmp_path / "bad")
    bad["objective"]["label_smoothing"] = 1.5
    load_config(bad)
    with pytest.raises(ConfigError, match=r"^\[objective\] objective .*label_smoothing must be"):
        train(bad)


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("model", {"name": MODEL, "width": 3}, r"^\[model\] model .*unknown option 'width'"),
        ("data", {"name": DATA, "seed": 1}, r"^\[data\] dataset .*unknown option 'seed'"),
        ("objective", {"name": "nope"}, r"^\[objective\] unknown objective 'nope'; available"),
        ("finetune", {"name": "nope"}, r"^\[finetune\] unknown finetuner 'nope'; available"),
        ("transfer", {"name": "nope"}, r"^\[transfer\] unknown transfer strategy 'nope'"),
    ],
)
def test_resolve_names_the_section(registered, tmp_path, section, value, message):
    cfg = base_config(tmp_path / "run")
    cfg[section] = value
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)
    unchecked = load_config(cfg, check_names=False)
    with pytest.raises(ConfigError, match=message):
        build.resolve(unchecked)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before the output directory is made
