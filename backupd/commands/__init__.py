"""The verbs of the ``backupd`` command, one module each.

Every module here exposes ``NAME``, ``HELP``, ``DESCRIPTION`` (help text with examples),
``add_arguments(parser)`` and ``execute(args, context) -> int``. :mod:`backupd.cli`
registers them in the order of :data:`VERBS`; a module that is missing is skipped so the
command keeps working while a verb is absent.  A verb that unblocks SIGINT/SIGTERM itself
(at a point where it can handle them) says ``HANDLES_SIGNALS = True``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from backupd.config import Config

VERBS = ("run", "list", "status", "serve", "restore", "verify", "prune", "merge")


class Command(Protocol):
    NAME: str
    HELP: str
    DESCRIPTION: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def execute(self, args: argparse.Namespace, context: CommandContext) -> int: ...


@dataclass
class CommandContext:
    """What every verb gets besides its arguments: the config file path and output settings."""

    config_path: Path
    quiet: bool = False
    _config: Config | None = field(default=None, repr=False)

    def config(self) -> Config:
        """Load and validate the configuration once (raises ConfigError)."""
        if self._config is None:
            from backupd.config import load_config

            self._config = load_config(self.config_path)
        return self._config
