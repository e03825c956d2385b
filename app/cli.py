"""Subcommands of the `app` package (filled in by its issue)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this package's subcommands on the `moco-search` parser."""
