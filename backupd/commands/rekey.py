"""``backupd rekey``: a new key for every encrypted backup of a VM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from pathlib import Path

from backupd.commands import CommandContext
from backupd.errors import UsageError
from backupd.keys import load_key
from backupd.rekey import rekey_vm
from backupd.storage.repositories import local_repository

NAME = "rekey"
DESCRIPTION = """\
Give every encrypted backup file of a VM a new key: a LUKS key slot for the new key is
added and the old key's slots are removed, with qemu-img amend; no data is
re-encrypted.  The old key is the VM's configured key_file; afterwards set key_file to
the new one.  An interrupted rekey is finished by running it again.

examples:
  backupd keygen /etc/backupd/new.key
  backupd rekey --vm guest1 --new-key-file /etc/backupd/new.key
"""

log = logging.getLogger("backupd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", required=True)
    parser.add_argument("--new-key-file", type=Path, required=True, help="the new key file")


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    config = context.config()
    vm = config.vm(args.vm)
    if vm.encryption is None:
        raise UsageError(f"vm {vm.name} has no encryption configured: nothing to rekey")
    new_settings = dataclasses.replace(vm.encryption, key_file=args.new_key_file)
    repo = local_repository(config, "backupd rekey").vm(vm.name)
    with load_key(vm.encryption) as old, load_key(new_settings) as new:
        if old.passphrase == new.passphrase:
            raise UsageError(f"{args.new_key_file} holds the same key as {old.settings.key_file}")
        report = asyncio.run(rekey_vm(repo, old, new, f"backupd rekey --vm {vm.name}"))
    log.info(
        "%s: %d files rekeyed, %d had the new key already, %d not encrypted; now set key_file: %s",
        vm.name,
        report.changed,
        report.already,
        report.plain,
        args.new_key_file,
    )
    return 0
