"""``backupd verify``: check backups' structure and recorded digests."""

from __future__ import annotations

import argparse
import asyncio
import logging

from backupd.commands import CommandContext
from backupd.errors import ExitCode, NotFoundError, RepositoryError
from backupd.keys import vm_key
from backupd.logs import human_bytes
from backupd.storage.repositories import repository_for
from backupd.storage.vmrepo import VMRepo
from backupd.verify import verify_backup

NAME = "verify"
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


def _targets(repo: VMRepo, args: argparse.Namespace) -> list[str]:
    """The backups to verify: all, one, or the latest with what it needs (just the latest
    when its own manifest is damaged, so that the damage is reported as such)."""
    repo.refuse_unfinished_merge()
    if args.all:
        return repo.ids()
    if args.backup is not None:
        return [repo.resolve(args.backup).id]
    ids = repo.ids()
    if not ids:
        raise NotFoundError(f"vm {repo.vm} has no backups in {repo.where}")
    try:
        return [m.id for m in repo.chain(ids[-1])]
    except RepositoryError:
        return [ids[-1]]


async def _verify(args: argparse.Namespace, context: CommandContext) -> int:
    config = context.config()
    vm = config.vm(args.vm)
    repo = repository_for(config).vm(vm.name)
    damaged: list[str] = []
    with vm_key(vm.encryption) as key, repo.readers(purpose=f"backupd verify --vm {args.vm}"):
        ids = _targets(repo, args)
        for backup in ids:
            report = await verify_backup(repo, backup, key)
            if not report.ok:
                damaged.append(backup)
                for problem in report.problems:
                    log.error("%s/%s: DAMAGED: %s", repo.vm, backup, problem)
                continue
            summary = f"{report.digests} digests, {human_bytes(report.bytes)} checked"
            broken = [b for b in report.needs if b in damaged]
            if broken:
                log.warning(
                    "%s/%s: ok (%s), but depends on damaged %s",
                    repo.vm,
                    backup,
                    summary,
                    ", ".join(broken),
                )
            else:
                log.info("%s/%s: ok (%s)", repo.vm, backup, summary)
    if damaged:
        log.error("%s: %d of %d backups damaged", repo.vm, len(damaged), len(ids))
        return int(ExitCode.DAMAGED)
    return 0


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    return asyncio.run(_verify(args, context))
