"""``backupd copy``: replicate a VM's committed backups into another repository."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from backupd.commands import CommandContext
from backupd.errors import UsageError
from backupd.keys import vm_key
from backupd.logs import human_bytes
from backupd.replication import copy_vm
from backupd.storage.location import parse_location
from backupd.storage.repositories import open_location, repository_for

NAME = "copy"
DESCRIPTION = """\
Copy the committed backups of a VM from the configured repository into another one (a
local folder or s3://BUCKET/PREFIX, reached with the configuration's s3: settings):
only the backups the target lacks, parents before children, every stored byte checked
against the manifest's digests on the way, each image checked again once it arrived,
and the target's manifest written last.  An interrupted copy is resumed by running it
again.  The target is a repository like any other (list, verify, restore, serve it
with a configuration that names it).

examples:
  backupd copy --vm guest1 --to s3://backups/site-a      # local repository -> bucket
  backupd copy --vm guest1 --to /mnt/offsite/backupd     # e.g. bucket -> local folder
"""

log = logging.getLogger("backupd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", required=True)
    parser.add_argument("--to", required=True, metavar="URL", help="a folder or s3://BUCKET/PREFIX")


async def _copy(args: argparse.Namespace, context: CommandContext) -> int:
    config = context.config()
    vm_config = config.vm(args.vm)
    vm = vm_config.name
    location = parse_location(args.to, Path.cwd(), "--to")
    if location == config.repository:
        raise UsageError(f"--to {args.to} is the configured repository itself")
    source = repository_for(config).vm(vm)
    target = open_location(location, config).vm(vm)
    purpose = f"backupd copy --vm {vm}"
    with vm_key(vm_config.encryption) as key:
        result = await copy_vm(
            source,
            target,
            purpose=purpose,
            report=print if not context.quiet else _silent,
            key=key,
        )
    log.info(
        "copy: vm=%s to=%s copied=%d present=%d failed=%d bytes=%s",
        vm,
        target.where,
        len(result.copied),
        len(result.present),
        len(result.failed),
        human_bytes(result.bytes),
    )
    return 1 if result.failed else 0


def _silent(*values: object) -> None:
    """A report nobody asked for (``--quiet``)."""


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    return asyncio.run(_copy(args, context))
