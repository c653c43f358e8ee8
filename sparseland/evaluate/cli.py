"""Placeholder: subcommands for this area are added here (listed in sparseland.cli.COMMAND_MODULES)."""

from __future__ import annotations


def add_commands(sub) -> None:  # noqa: ARG001
    return None
