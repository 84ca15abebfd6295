"""Placeholder: filled in by the augmentation module."""


def register_all(register):
    """Registers this module's strategies."""
