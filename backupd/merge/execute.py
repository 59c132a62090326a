"""Carrying out a merge plan, journaled, and finishing one a kill interrupted.

The order: the journal (the dropped backups stop being points in time), then each fold
(its data, then the exchange of files and manifest), then the removal of every dropped
backup, then the journal goes.  Each step is durable before the journal moves past it,
and each is safe to do again, so whatever instant a kill picks, :func:`finish` (called
by the next prune, merge or run, which hold the VM's locks) completes the plan.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable

from backupd.errors import RepositoryError
from backupd.faults import checkpoint
from backupd.keys import Key
from backupd.logs import human_bytes
from backupd.manifest import Manifest
from backupd.merge.fold import check_fold, exchange, fold
from backupd.merge.journal import Journal, State, clear_journal, read_journal, write_journal
from backupd.merge.plan import Direction, MergePlan, plan_merges
from backupd.repository import VMRepository

log = logging.getLogger("backupd.merge")


async def apply(repo: VMRepository, plan: MergePlan, key: Key | None = None) -> None:
    """Fold and remove as planned (the caller holds the VM's lock and its readers' lock
    exclusively; ``key``: the VM's encryption key, when it has one)."""
    if not plan.changes:
        return
    for what in plan.folds:  # a file the gate refuses stops the merge before it starts
        check_fold(repo, what, key)
    journal = Journal(plan)
    write_journal(repo, journal)
    checkpoint("merge-after-journal")
    await _carry_on(repo, journal, key=key)


async def finish(repo: VMRepository, key: Key | None = None) -> bool:
    """Complete a merge a kill interrupted, if there is one (same locks as :func:`apply`)."""
    journal = read_journal(repo)
    if journal is None:
        return False
    log.warning("%s: finishing a merge that was interrupted", repo.vm)
    await _carry_on(repo, journal, resumed=True, key=key)
    return True


async def _carry_on(
    repo: VMRepository, journal: Journal, resumed: bool = False, key: Key | None = None
) -> None:
    plan = journal.plan
    while (index := journal.current) is not None:
        what = plan.folds[index]
        if journal.state is not State.SWAP:
            result = await fold(repo, what, resumed, key)
            kind = "a full" if what.direction is Direction.DOWN else f"on {what.parent}"
            log.info(
                "%s: merged %s into %s (now %s): %s merged, %.2f s",
                repo.vm,
                ", ".join(what.folded),
                what.target,
                kind,
                human_bytes(result.merged),
                result.seconds,
            )
            journal.state = State.SWAP
            write_journal(repo, journal)
            checkpoint("merge-before-exchange")
        exchange(repo, what)
        checkpoint("merge-after-exchange")
        journal.done.append(index)
        journal.state = State.FOLD
        write_journal(repo, journal)
    journal.state = State.REMOVE
    write_journal(repo, journal)
    for backup in plan.dropped:
        _remove(repo, backup)
        checkpoint("merge-mid-remove")
    clear_journal(repo)
    checkpoint("merge-done")


def _remove(repo: VMRepository, backup: str) -> None:
    path = repo.path / backup
    try:
        os.close(repo.folder(backup))  # a real folder of this VM (no symlink), or refused
    except FileNotFoundError:
        return
    except RepositoryError as exc:
        raise RepositoryError(f"cannot remove backup {backup}: {exc}") from None
    shutil.rmtree(path)
    with contextlib.suppress(OSError):
        fd = repo.folder()
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    log.info("%s: removed backup %s", repo.vm, backup)


async def merge_vm(
    repo: VMRepository,
    choose: Callable[[list[Manifest]], set[str]],
    *,
    purpose: str,
    dry_run: bool = False,
    report: Callable[[str], object] = print,
    key: Key | None = None,
) -> MergePlan:
    """Under the VM's locks: finish an interrupted merge, keep what ``choose`` selects
    of the backups, fold or remove the rest; ``report`` gets one line per backup."""
    with repo.lock(purpose=purpose), repo.readers(exclusive=True, purpose=purpose):
        if repo.unfinished_merge():
            if dry_run:
                raise RepositoryError(
                    f"vm {repo.vm}: a merge was interrupted; run without --dry-run to finish it"
                )
            await finish(repo, key)
        try:
            manifests = repo.backups()
        except RepositoryError as exc:
            raise RepositoryError(
                f"nothing merged or removed: {exc} (see backupd verify --vm {repo.vm}; "
                "repair or remove it)"
            ) from None
        keep = choose(manifests)
        for backup in sorted(keep):  # a kept backup with a broken chain: change nothing
            try:
                repo.chain(backup)
            except RepositoryError as exc:
                raise RepositoryError(f"nothing merged or removed: {exc}") from None
        plan = plan_merges({m.id: m.parent for m in manifests}, keep)
        for manifest in manifests:
            action = plan.action(manifest.id)
            if dry_run and not action.startswith("keep"):
                action = f"would {action}"
            report(f"{repo.vm}: {manifest.id}  {action}")
        if not dry_run:
            await apply(repo, plan, key)
        return plan
