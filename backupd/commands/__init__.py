"""The verbs of the ``backupd`` command, one module each.

:data:`VERBS` names every verb with its one-line help; only the module of the verb
being run is imported (the others cost nothing at start-up).  Every module here exposes
``NAME``, ``DESCRIPTION`` (help text with examples), ``add_arguments(parser)`` and
``execute(args, context) -> int``.  A verb that unblocks SIGINT/SIGTERM itself (at a
point where it can handle them) says ``HANDLES_SIGNALS = True``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from backupd.config import Config

#: every verb, in the order ``backupd --help`` lists them, with its one-line help
VERBS = {
    "run": "take a backup (incremental when possible, else full)",
    "list": "list backups",
    "status": "show the backup status of every VM",
    "serve": "serve a backup read-only over NBD",
    "restore": "restore a disk from a backup",
    "verify": "verify backups (structure and stored data)",
    "prune": "keep what the retention policy selects; merge or remove the rest",
    "merge": "fold the backups older than one into it (it becomes a full)",
    "keygen": "create a key file for encrypted backups",
    "rekey": "give every encrypted backup of a VM a new key (no data re-encrypted)",
    "copy": "copy committed backups into another repository (a folder or s3://)",
}


class Command(Protocol):
    NAME: str
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
