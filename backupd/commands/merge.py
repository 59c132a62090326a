"""``backupd merge``: fold every backup older than one into it, on demand."""

from __future__ import annotations

import argparse
import asyncio

from backupd.commands import CommandContext
from backupd.errors import NotFoundError
from backupd.keys import vm_key
from backupd.manifest import Manifest
from backupd.merge.execute import merge_vm
from backupd.storage.repositories import repository_for

NAME = "merge"
DESCRIPTION = """\
Fold every backup that BACKUP builds on (the older backups of its chain) into it: BACKUP
becomes a full and the older backups of its chain are gone.  Newer backups and other
chains are not touched.  Copies only what the merged backups hold; an interrupted merge
is finished by the next prune, merge or backup run.

examples:
  backupd merge --vm guest1 --until 20261124T013000Z --dry-run
  backupd merge --vm guest1 --until 20261124T013000Z
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", required=True)
    parser.add_argument("--until", required=True, metavar="BACKUP", help="the backup to fold into")
    parser.add_argument("--dry-run", action="store_true", help="only say what would happen")


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    config = context.config()
    vm = config.vm(args.vm)
    repo = repository_for(config).vm(vm.name)

    def until(manifests: list[Manifest]) -> set[str]:
        by_id = {m.id: m for m in manifests}
        if args.until not in by_id:
            raise NotFoundError(f"vm {repo.vm} has no backup {args.until}")
        older: set[str] = set()
        parent = by_id[args.until].parent
        while parent is not None:
            older.add(parent)
            parent = by_id[parent].parent
        return set(by_id) - older

    with vm_key(vm.encryption) as key:
        asyncio.run(
            merge_vm(
                repo, until, purpose=f"backupd merge --vm {repo.vm}", dry_run=args.dry_run, key=key
            )
        )
    return 0
