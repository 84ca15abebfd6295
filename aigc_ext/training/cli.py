"""Placeholder command."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds this subcommand to the ``aigc-ext`` parser."""
