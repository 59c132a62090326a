"""``backupd prune``: remove backups the retention policy no longer keeps."""

from __future__ import annotations

import argparse
import logging
import shutil

from backupd.commands import CommandContext
from backupd.config import Config, VMConfig
from backupd.errors import BackupdError, RepositoryError, UsageError
from backupd.repository import Repository
from backupd.retention import close_over_chains, select

NAME = "prune"
HELP = "remove backups the retention policy does not keep"
DESCRIPTION = """\
Apply the retention policy (keep_last, keep_daily, keep_weekly, keep_monthly; top-level
defaults, overridable per VM).  A backup that a kept backup needs through its chain is
kept.  Nothing is removed while a backup, serve or restore of the VM is running.

examples:
  backupd prune --vm guest1 --dry-run
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
    parser.add_argument("--dry-run", action="store_true", help="only say what would go")


def execute(args: argparse.Namespace, context: CommandContext) -> int:
    config = context.config()
    if not args.all:
        vm = config.vm(args.vm)
        if not vm.retention.configured:
            raise UsageError(
                f"no retention configured for vm {vm.name} (keep_last, keep_daily, ...)"
            )
        return _prune(config, vm, args.dry_run, context.quiet)
    worst = 0
    for name in sorted(config.vms):
        vm = config.vm(name)
        if not vm.retention.configured:
            log.info("%s: no retention configured; nothing pruned", name)
            continue
        try:
            code = _prune(config, vm, args.dry_run, context.quiet)
        except BackupdError as exc:
            log.error("%s: %s", name, exc)
            code = exc.exit_code
        worst = worst or code
    return worst


def _prune(config: Config, vm: VMConfig, dry_run: bool, quiet: bool) -> int:
    """Prune one VM; the keep/remove report goes to stdout unless ``quiet`` (a dry run
    always reports)."""
    report = print if dry_run or not quiet else _silent
    repo = Repository(config.repository).vm(vm.name)
    with (
        repo.lock(purpose=f"backupd prune --vm {vm.name}"),
        repo.readers(exclusive=True, purpose=f"backupd prune --vm {vm.name}"),
    ):
        try:
            manifests = repo.backups()
        except RepositoryError as exc:
            raise RepositoryError(
                f"nothing pruned: {exc} (see backupd verify --vm {vm.name}; repair or remove it)"
            ) from None
        parents = {m.id: m.parent for m in manifests}
        keep = close_over_chains(select(list(parents), vm.retention), parents)
        for backup in keep:  # a kept backup with a broken chain: change nothing
            try:
                repo.chain(backup)
            except RepositoryError as exc:
                raise RepositoryError(f"nothing pruned: {exc}") from None
        for backup in sorted(parents):
            if backup in keep:
                report(f"{vm.name}: keep   {backup}  ({keep[backup]})")
            else:
                report(
                    f"{vm.name}: {'would remove' if dry_run else 'remove'} {backup}  "
                    "(not kept by the retention policy)"
                )
        if dry_run:
            return 0
        for backup in sorted(set(parents) - set(keep), reverse=True):
            shutil.rmtree(repo.path / backup)
            log.info("%s: removed backup %s", vm.name, backup)
    return 0
