"""Placeholder: filled in by the finetuning module."""


def register_all(register):
    """Registers this module's strategies."""
