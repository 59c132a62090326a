"""``backupd keygen``: a new encryption key file."""

from __future__ import annotations

import argparse
from pathlib import Path

from backupd.commands import CommandContext
from backupd.keys import keygen

NAME = "keygen"
DESCRIPTION = """\
Create a key file for encrypted backups: 32 random bytes written as 64 hex digits,
mode 0400.  It never overwrites a file.  The key is the only way back to the data of
encrypted backups: keep a copy somewhere safe, away from the repository.

examples:
  backupd keygen /etc/backupd/backupd.key
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="the key file to create")


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    keygen(args.path)
    print(f"wrote a new key to {args.path} (mode 0400); keep a copy away from the repository")
    return 0
