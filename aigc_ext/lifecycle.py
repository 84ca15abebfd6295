"""The state of a training run, and :func:`notify`, which calls the lifecycle hooks.

A training loop calls ``notify("train_begin", state)``, ``notify("step_end", state)`` after each
step, ``notify("evaluate", state, metrics=...)``, ``notify("save", state, path=...)`` and
``notify("train_end", state)``, and after each call honours ``state.should_stop`` and
``state.should_save``, which a hook may set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EVENTS", "RunState", "notify"]

# event -> the arguments its hook takes besides ``state``
EVENTS = {
    "train_begin": (),
    "step_end": (),
    "evaluate": ("metrics",),
    "save": ("path",),
    "train_end": (),
}


@dataclass
class RunState:
    """What lifecycle hooks see of a run; hooks may set ``should_stop`` and ``should_save``."""

    step: int = 0
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    should_stop: bool = False
    should_save: bool = False


def notify(event: str, state: RunState, **kwargs) -> RunState:
    """Calls hook ``aigc_on_<event>`` of every plugin with ``state`` (and ``kwargs``).

    For ``evaluate`` the metrics are merged into ``state.metrics`` first. Returns ``state``.
    """
    from aigc_ext import plugins

    try:
        expected = EVENTS[event]
    except KeyError:
        raise ValueError(f"unknown event {event!r}; known: {', '.join(EVENTS)}") from None
    if set(kwargs) != set(expected):
        raise TypeError(
            f"event {event!r} takes {', '.join(expected) or 'no'} argument(s) besides state, "
            f"got {', '.join(sorted(kwargs)) or 'none'}"
        )
    if event == "evaluate":
        state.metrics.update(kwargs["metrics"])
    plugins.load()
    getattr(plugins.pm.hook, f"aigc_on_{event}")(state=state, **kwargs)
    return state
