"""Placeholder: filled in by the transfer module."""


def register_all(register):
    """Registers this module's strategies."""
