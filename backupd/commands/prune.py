"""``backupd prune``: keep what the retention policy selects; fold the rest into it."""

from __future__ import annotations

import argparse
import asyncio
import logging

from backupd.commands import CommandContext
from backupd.config import Config, VMConfig
from backupd.errors import BackupdError, UsageError
from backupd.keys import vm_key
from backupd.manifest import Manifest
from backupd.merge.execute import merge_vm
from backupd.retention import select
from backupd.storage.repositories import repository_for

NAME = "prune"
DESCRIPTION = """\
Apply the retention policy (keep_last, keep_daily, keep_weekly, keep_monthly; top-level
defaults, overridable per VM).  Afterwards the repository holds exactly the backups the
policy selects: older backups a kept one builds on are merged into it (the oldest kept
backup of a chain becomes a full; dropped backups between two kept ones are merged into
the later one), and the others are removed.  Merging copies only what the merged
backups hold, never the whole disk again, and every backup stays a plain qcow2 file.
Nothing changes while a backup, serve or restore of the VM is running; an interrupted
prune is finished by the next prune or backup run.

examples:
  backupd prune --vm guest1 --dry-run   # per backup: keep / remove / merge into X
  backupd prune --vm guest1
  backupd prune --all          # every VM with a retention policy (others are skipped)
"""

log = logging.getLogger("backupd")


def _silent(*values: object) -> None:
    """A report nobody asked for (``--quiet``)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--vm", help="the VM whose backups to prune")
    which.add_argument(
        "--all", action="store_true", help="every VM with a retention policy configured"
    )
    parser.add_argument("--dry-run", action="store_true", help="only say what would happen")


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    config = context.config()
    if not args.all:
        vm = config.vm(args.vm)
        if not vm.retention.configured:
            raise UsageError(
                f"no retention configured for vm {vm.name} (keep_last, keep_daily, ...)"
            )
        return asyncio.run(_prune(config, vm, args.dry_run, context.quiet))
    worst = 0
    for name in sorted(config.vms):
        vm = config.vm(name)
        if not vm.retention.configured:
            log.info("%s: no retention configured; nothing pruned", name)
            continue
        try:
            code = asyncio.run(_prune(config, vm, args.dry_run, context.quiet))
        except BackupdError as exc:
            log.error("%s: %s", name, exc)
            code = exc.exit_code
        worst = worst or code
    return worst


async def _prune(config: Config, vm: VMConfig, dry_run: bool, quiet: bool) -> int:
    """Prune one VM; the per-backup report goes to stdout unless ``quiet`` (a dry run
    always reports)."""

    def policy(manifests: list[Manifest]) -> set[str]:
        return set(select([m.id for m in manifests], vm.retention))

    with vm_key(vm.encryption) as key:
        await merge_vm(
            repository_for(config).vm(vm.name),
            policy,
            purpose=f"backupd prune --vm {vm.name}",
            dry_run=dry_run,
            report=print if dry_run or not quiet else _silent,
            key=key,
        )
    return 0
