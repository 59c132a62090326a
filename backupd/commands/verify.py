"""``backupd verify``: check backups' structure and recorded digests."""

from __future__ import annotations

import argparse
import asyncio
import logging

from backupd.commands import CommandContext
from backupd.errors import ExitCode
from backupd.logs import human_bytes
from backupd.repository import Repository
from backupd.verify import verify_backup

NAME = "verify"
HELP = "verify backups (structure and stored data)"
DESCRIPTION = """\
Verify backups without the VM: manifests, chain links, qemu-img check of every file,
backing paths inside the repository, and the digest of every stored data run.
Exit code 4 when anything is damaged.

examples:
  backupd verify --vm guest1                  # the latest backup (and what it needs)
  backupd verify --vm guest1 --backup 20261124T030000Z
  backupd verify --vm guest1 --all
"""

log = logging.getLogger("backupd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", required=True)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--backup", help="backup id (default: latest)")
    which.add_argument("--all", action="store_true", help="every backup of the VM")


async def _verify(args: argparse.Namespace, context: CommandContext) -> int:
    config = context.config()
    repo = Repository(config.repository).vm(config.vm(args.vm).name)
    with repo.readers(purpose=f"backupd verify --vm {args.vm}"):
        if args.all:
            ids = repo.ids()
        else:
            target = repo.resolve(args.backup)
            ids = [m.id for m in repo.chain(target.id)] if args.backup is None else [target.id]
        damaged = 0
        for backup in ids:
            report = await verify_backup(repo, backup)
            if report.ok:
                log.info(
                    "%s/%s: ok (%d digests, %s checked)",
                    repo.vm,
                    backup,
                    report.digests,
                    human_bytes(report.bytes),
                )
            else:
                damaged += 1
                for problem in report.problems:
                    log.error("%s/%s: DAMAGED: %s", repo.vm, backup, problem)
    if damaged:
        log.error("%s: %d of %d backups damaged", repo.vm, damaged, len(ids))
        return int(ExitCode.DAMAGED)
    return 0


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    return asyncio.run(_verify(args, context))
