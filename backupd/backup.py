"""One backup run of one VM, from lock to bitmap rotation.

lock -> QMP -> clean leftovers of a killed run -> plan -> stage -> (freeze) one
transaction (thaw) -> export -> copy all disks in parallel -> teardown -> commit ->
rotate bitmaps.  If anything fails before the commit, the new bitmap is removed and
the parent's keeps recording, so the next run captures every change: nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from backupd.config import Config, VMConfig
from backupd.errors import BackupFailed, QemuError, RepositoryError
from backupd.faults import checkpoint
from backupd.logs import human_bytes
from backupd.manifest import DiskRecord, Manifest
from backupd.planning import Plan, plan_backup
from backupd.progress import Progress
from backupd.qemu.fleece import (
    DiskExport,
    FleeceSession,
    bitmap_name,
    cleanup_leftovers,
    remove_bitmap,
)
from backupd.qemu.guest_agent import GuestAgent
from backupd.qemu.inventory import BITMAP_PREFIX, Disk, check_version, select_disks
from backupd.qemu.qmp import QemuMonitor
from backupd.repository import Repository, VMRepository
from backupd.transfer import run_pool, transfer_disk

log = logging.getLogger("backupd")

Hook = Callable[[], Awaitable[None]]


@dataclass
class RunHooks:
    """Test and integration points (e.g. guest writes right after the point in time)."""

    after_point_in_time: Hook | None = None
    before_commit: Hook | None = None


@dataclass
class RunResult:
    vm: str
    manifest: Manifest | None = None
    plan: Plan | None = None
    disks: list[str] = field(default_factory=list)
    duration: float = 0.0


def _runtime_dir(config: Config) -> Path:
    """A private 0700 folder for the NBD socket."""
    base = config.runtime_dir
    if base is None:
        run = Path("/run/backupd")
        base = run if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="nbd-", dir=base))


def _chain_length(repo: VMRepository, latest: Manifest | None) -> int:
    if latest is None:
        return 0
    try:
        return len(repo.chain(latest.id)) - 1
    except RepositoryError:
        return 1 << 30  # a broken chain: start a new one


async def _quiesce(vm: VMConfig, state: dict[str, bool]) -> tuple[Hook | None, Hook | None]:
    if not vm.guest_agent:
        return None, None
    agent = GuestAgent(vm.guest_agent, timeout=10.0)

    async def freeze() -> None:
        try:
            count = await agent.freeze()
            state["quiesced"] = count > 0
            log.info("%s: guest file systems frozen (%d)", vm.name, count)
        except QemuError as exc:
            log.warning(
                "%s: guest agent unavailable (%s); the backup is crash-consistent", vm.name, exc
            )
            await agent.thaw()

    async def thaw() -> None:
        was_frozen = agent.frozen
        await agent.thaw()
        if was_frozen:
            log.info("%s: guest file systems thawed", vm.name)

    return freeze, thaw


async def run_backup(
    config: Config,
    vm: VMConfig,
    mode: str = "auto",
    *,
    progress_mode: str = "none",
    hooks: RunHooks | None = None,
    result: RunResult | None = None,
) -> Manifest:
    """Take one backup of ``vm``; returns the committed manifest."""
    hooks = hooks or RunHooks()
    result = result or RunResult(vm.name)
    repo = Repository(config.repository).vm(vm.name)
    started = time.monotonic()
    with repo.lock(purpose=f"backupd run --vm {vm.name}"):
        checkpoint("after-lock")
        monitor = QemuMonitor(vm.qmp_address, timeout=vm.timeout)
        await monitor.connect()
        try:
            check_version(monitor.version)
            return await _run_locked(
                config, vm, mode, repo, monitor, progress_mode, hooks, result, started
            )
        finally:
            await monitor.close()


async def _run_locked(
    config: Config,
    vm: VMConfig,
    mode: str,
    repo: VMRepository,
    monitor: QemuMonitor,
    progress_mode: str,
    hooks: RunHooks,
    result: RunResult,
    started: float,
) -> Manifest:
    scratch_dir = config.scratch_dir / vm.name
    for stale in repo.staging():
        log.warning("%s: removing %s left by an interrupted run", vm.name, stale.name)
        shutil.rmtree(stale, ignore_errors=True)
    latest, damaged = repo.latest_good()
    for skipped, problem in damaged:
        log.warning("%s: backup %s is damaged, not continued from: %s", vm.name, skipped, problem)
    owned = {bitmap_name(latest.id)} if latest is not None else set()
    for item in await cleanup_leftovers(monitor, owned, scratch_dir):
        log.warning("%s: removed leftover %s", vm.name, item)
    checkpoint("after-cleanup")
    disks = await select_disks(monitor, vm.disks)
    result.disks = [d.name for d in disks]
    plan = plan_backup(mode, latest, _chain_length(repo, latest), disks, vm.max_chain)
    result.plan = plan
    backup = repo.new_id()
    log.info(
        "%s: %s backup %s of %s: %s",
        vm.name,
        plan.kind,
        backup,
        ", ".join(d.name for d in disks),
        plan.reason,
    )
    checkpoint("after-plan")
    staged = repo.stage(backup)
    socket_dir = _runtime_dir(config)
    state = {"quiesced": False}
    freeze, thaw = await _quiesce(vm, state)
    session = FleeceSession(
        monitor,
        disks,
        backup_id=backup,
        parent_id=plan.parent.id if plan.parent else None,
        scratch_dir=scratch_dir,
        socket_dir=socket_dir,
        method=vm.fleecing,
        before_transaction=freeze,
        after_transaction=thaw,
    )
    committed = False
    try:
        async with session as exports:
            checkpoint("after-export")
            if hooks.after_point_in_time is not None:
                await hooks.after_point_in_time()
            try:
                records = await _copy_all(exports, staged.path, plan, vm, progress_mode)
            except BackupFailed as exc:
                # a view that broke because the scratch area filled up: say so
                why = session.scratch_full()
                if why is None:
                    raise
                raise BackupFailed(f"{exc}; {why}") from exc
            checkpoint("after-copy")
        checkpoint("after-teardown")
        if hooks.before_commit is not None:
            await hooks.before_commit()
        manifest = Manifest(
            id=backup,
            vm=vm.name,
            kind=plan.kind,
            parent=plan.parent.id if plan.parent else None,
            created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            qemu_version=monitor.version_text,
            reason=plan.reason,
            quiesced=state["quiesced"],
            duration=round(time.monotonic() - started, 3),
            disks={r.name: r for r in records},
        )
        checkpoint("before-manifest")
        staged.commit(manifest)
        committed = True
        checkpoint("after-commit")
    finally:
        with contextlib.suppress(OSError):
            socket_dir.rmdir()
        if not committed:
            staged.abort()
            if session.transaction_done:
                await _forget_bitmap(monitor, disks, bitmap_name(backup))
    result.manifest = manifest
    await _rotate(monitor, disks, bitmap_name(backup), vm.name)
    checkpoint("after-rotate")
    result.duration = time.monotonic() - started
    log.info(
        "%s: backup %s committed: %s copied, %s stored%s",
        vm.name,
        backup,
        human_bytes(manifest.bytes_copied),
        human_bytes(manifest.bytes_stored),
        "" if manifest.quiesced else " (crash-consistent)",
    )
    return manifest


async def _copy_all(
    exports: list[DiskExport],
    folder: Path,
    plan: Plan,
    vm: VMConfig,
    progress_mode: str,
) -> list[DiskRecord]:
    bars: list[Progress] = []
    pool = run_pool(vm.transfer)  # buffers shared by the disks: memory is per run

    async def one(export: DiskExport) -> DiskRecord:
        bar: Progress | None = None

        def on_total(total: int) -> None:
            nonlocal bar
            if progress_mode != "none":
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
            path=folder / f"{export.disk.name}.qcow2",
            backing_file=backing,
            settings=vm.transfer,
            # a stalled qemu fails the run instead of hanging it
            request_timeout=max(vm.timeout, 5.0),
            progress=on_progress,
            on_total=on_total,
            pool=pool,
        )

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(e)) for e in exports]
    except BaseExceptionGroup as group_error:
        # one clear error: the first failure that is not a consequence of cancelling
        cause = _first_cause(group_error)
        if isinstance(cause, asyncio.CancelledError):
            raise cause from None
        raise _as_backup_error(cause) from cause
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


def _as_backup_error(exc: BaseException) -> BaseException:
    from nbdclient import NBDError

    exc = _first_cause(exc)
    if isinstance(exc, NBDError):
        return BackupFailed(f"reading the disk over NBD failed: {exc}")
    if isinstance(exc, OSError):
        return BackupFailed(
            f"writing the backup failed: {exc.strerror or exc}"
            f"{': ' + str(exc.filename) if exc.filename else ''}"
        )
    return exc


async def _forget_bitmap(monitor: QemuMonitor, disks: list[Disk], name: str) -> None:
    """After a failure: drop the new bitmap; the parent's still records every change."""
    for disk in disks:
        try:
            await asyncio.shield(remove_bitmap(monitor, disk.node, name))
        except (QemuError, asyncio.CancelledError) as exc:
            log.warning(
                "could not remove bitmap %s on %s (%s); the next run removes it",
                name,
                disk.name,
                exc,
            )


async def _rotate(monitor: QemuMonitor, disks: list[Disk], keep: str, vm: str) -> None:
    """After the commit: only the new bitmap keeps recording."""
    for disk in disks:
        for bitmap in disk.bitmaps:
            if bitmap.name.startswith(BITMAP_PREFIX) and bitmap.name != keep:
                try:
                    await remove_bitmap(monitor, disk.node, bitmap.name)
                    checkpoint("mid-rotate")
                except QemuError as exc:
                    log.warning(
                        "%s: could not remove old bitmap %s on %s (%s); the next run removes it",
                        vm,
                        bitmap.name,
                        disk.name,
                        exc,
                    )
