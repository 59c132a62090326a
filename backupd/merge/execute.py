"""Carrying out a merge plan, journaled, and finishing one a kill interrupted.

The order: the journal (the dropped backups stop being points in time), then each fold
(its data, then the exchange of files and manifest), then the removal of every dropped
backup, then the journal goes.  Each step is durable before the journal moves past it,
and each is safe to do again, so whatever instant a kill picks, :func:`finish` (called
by the next prune, merge or run, which hold the VM's locks) completes the plan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from backupd.errors import RepositoryError
from backupd.faults import checkpoint
from backupd.keys import Key
from backupd.logs import human_bytes
from backupd.manifest import Manifest
from backupd.merge.journal import Journal, State, clear_journal, read_journal, write_journal
from backupd.merge.plan import Direction, MergePlan, plan_merges
from backupd.storage.vmrepo import VMRepo

log = logging.getLogger("backupd.merge")


async def apply(repo: VMRepo, plan: MergePlan, key: Key | None = None) -> None:
    """Fold and remove as planned (the caller holds the VM's lock and its readers' lock
    exclusively; ``key``: the VM's encryption key, when it has one).  How is the
    storage's (:meth:`VMRepo.merge_steps`): qemu-img in place on a local disk, objects
    rewritten in a bucket."""
    if not plan.changes:
        return
    for what in plan.folds:  # a file the gate refuses stops the merge before it starts
        repo.merge_steps().check_fold(repo, what, key)
    journal = Journal(plan)
    write_journal(repo, journal)
    checkpoint("merge-after-journal")
    await _carry_on(repo, journal, key=key)


async def finish(repo: VMRepo, key: Key | None = None) -> bool:
    """Complete a merge a kill interrupted, if there is one (same locks as :func:`apply`)."""
    journal = read_journal(repo)
    if journal is None:
        return False
    log.warning("%s: finishing a merge that was interrupted", repo.vm)
    await _carry_on(repo, journal, resumed=True, key=key)
    return True


async def _carry_on(
    repo: VMRepo, journal: Journal, resumed: bool = False, key: Key | None = None
) -> None:
    plan = journal.plan
    steps = repo.merge_steps()
    while (index := journal.current) is not None:
        what = plan.folds[index]
        if journal.state is not State.SWAP:
            result = await steps.fold(repo, what, resumed, key)
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
        steps.exchange(repo, what)
        checkpoint("merge-after-exchange")
        journal.done.append(index)
        journal.state = State.FOLD
        write_journal(repo, journal)
    journal.state = State.REMOVE
    write_journal(repo, journal)
    for backup in plan.dropped:
        steps.remove(repo, backup)
        log.info("%s: removed backup %s", repo.vm, backup)
        checkpoint("merge-mid-remove")
    clear_journal(repo)
    checkpoint("merge-done")


async def merge_vm(
    repo: VMRepo,
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
