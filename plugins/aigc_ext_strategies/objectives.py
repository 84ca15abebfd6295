"""Placeholder: filled in by the objectives module."""


def register_all(register):
    """Registers this module's strategies."""
