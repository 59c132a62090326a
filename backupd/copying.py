"""Copying every disk of one run at once: one buffer pool for the run (memory is per
run, not per disk), a progress bar per disk, and one clear error when a copy fails."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from backupd.config import VMConfig
from backupd.errors import BackupFailed
from backupd.manifest import DiskRecord
from backupd.planning import Plan
from backupd.progress import Progress, ProgressMode
from backupd.qemu.fleece import DiskExport
from backupd.transfer import run_pool, transfer_disk

if TYPE_CHECKING:
    from backupd.qcow2.encryption import KeySpec
    from backupd.storage.vmrepo import Staged


async def copy_disks(
    exports: list[DiskExport],
    staging: Staged,
    plan: Plan,
    vm: VMConfig,
    progress_mode: ProgressMode,
    encryption: KeySpec | None = None,
) -> list[DiskRecord]:
    bars: list[Progress] = []
    # buffers shared by the disks: memory is per run
    pool = run_pool(vm.transfer, staging.read_buffers(vm.transfer))

    async def one(export: DiskExport) -> DiskRecord:
        bar: Progress | None = None

        def on_total(total: int) -> None:
            nonlocal bar
            if progress_mode is not ProgressMode.NONE:
                bar = Progress(f"{vm.name}/{export.disk.name}", total, mode=progress_mode)
                bars.append(bar)

        def on_progress(n: int) -> None:
            if bar is not None:
                bar.update(n)

        backing = f"../{plan.parent.id}/{export.disk.name}.qcow2" if plan.parent else None
        return await transfer_disk(
            name=export.disk.name,
            node=export.disk.node,
            uri=export.uri,
            dirty_context=export.dirty_context,
            staging=staging,
            backing_file=backing,
            settings=vm.transfer,
            disks=len(exports),
            # a stalled qemu fails the run instead of hanging it
            request_timeout=max(vm.timeout, 5.0),
            progress=on_progress,
            on_total=on_total,
            pool=pool,
            encryption=encryption,
        )

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(e)) for e in exports]
    except BaseExceptionGroup as group_error:
        # one clear error: the first failure that is not a consequence of cancelling
        cause = _first_cause(group_error)
        if isinstance(cause, asyncio.CancelledError):
            raise cause from None
        raise _as_backup_error(cause, staging.where) from cause
    finally:
        for bar in bars:
            bar.close()
    return [t.result() for t in tasks]


def _first_cause(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def _as_backup_error(exc: BaseException, folder: str) -> BaseException:
    from nbdclient import NBDError

    exc = _first_cause(exc)
    if isinstance(exc, NBDError):
        return BackupFailed(f"reading the disk over NBD failed: {exc}")
    if isinstance(exc, OSError):
        # a failed pwrite names no file: say where the backup was being written
        where = exc.filename or folder
        return BackupFailed(f"writing the backup failed: {exc.strerror or exc}: {where}")
    return exc
