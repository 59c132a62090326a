"""One backup run of one VM, from lock to bitmap rotation.

:class:`BackupRun` reads top to bottom: take the locks; open the source of the disks
(the VM's qemu and its guest agent, thawing a guest left frozen; or, when its qemu is
not running, its images in backupd's own qemu-storage-daemon: :mod:`backupd.sources`);
clean what a killed run left; plan full or incremental; take the point in time (file
systems frozen around it) and export the views; copy every disk; commit; rotate the
bitmaps.  If anything fails before the commit, the new bitmap is removed and the
parent's keeps recording, so the next run captures every change: nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from backupd.bitmaps import CheckpointNames
from backupd.chain import check_image
from backupd.config import Config, VMConfig
from backupd.copying import copy_disks
from backupd.errors import (
    BackupFailed,
    BusyError,
    EncryptionKeyError,
    QemuError,
    RepositoryError,
)
from backupd.faults import checkpoint
from backupd.keys import Key, vm_key
from backupd.lock import host_lock_path, vm_lock
from backupd.logs import human_bytes
from backupd.manifest import Consistency, DiskRecord, Manifest, VMState
from backupd.planning import Mode, Plan, plan_backup
from backupd.private import private_dir, runtime_base
from backupd.progress import ProgressMode
from backupd.qemu.blockops import remove_bitmap
from backupd.qemu.inventory import Disk
from backupd.qemu.qmp import QemuMonitor
from backupd.quiesce import freeze_window
from backupd.shield import run_to_completion
from backupd.sources import Source, open_source
from backupd.storage.repositories import repository_for
from backupd.storage.vmrepo import Staged

if TYPE_CHECKING:
    from backupd.qcow2.encryption import KeySpec

log = logging.getLogger("backupd")

Hook = Callable[[], Awaitable[None]]


@dataclass
class RunHooks:
    """Test and integration points (e.g. guest writes right after the point in time)."""

    after_point_in_time: Hook | None = None
    before_commit: Hook | None = None


@dataclass
class RunResult:
    """What a run got to: filled in as it goes, so a failed run still says how far."""

    vm: str
    manifest: Manifest | None = None
    plan: Plan | None = None
    disks: list[str] = field(default_factory=list)
    duration: float = 0.0
    #: the file systems were frozen at the point in time (else crash-consistent)
    quiesced: bool = False
    #: "online" (the VM's qemu) or "offline" (its images); None before it was known
    source: VMState | None = None

    @property
    def consistency(self) -> Consistency:
        return Consistency.QUIESCED if self.quiesced else Consistency.CRASH_CONSISTENT


class BackupRun:
    """One backup of one VM; :meth:`execute` is the whole run."""

    def __init__(
        self,
        config: Config,
        vm: VMConfig,
        mode: Mode = Mode.AUTO,
        *,
        progress_mode: ProgressMode = ProgressMode.NONE,
        hooks: RunHooks | None = None,
        result: RunResult | None = None,
    ) -> None:
        self.config = config
        self.vm = vm
        self.mode = mode
        self.progress_mode = progress_mode
        self.hooks = hooks or RunHooks()
        self.result = result or RunResult(vm.name)
        self.root = repository_for(config)
        self.repo = self.root.vm(vm.name)
        self.scratch_dir = config.scratch_dir / vm.name
        self.started = time.monotonic()
        self.source: Source | None = None
        self.names = CheckpointNames("")
        self.disks: list[Disk] = []
        self.key: Key | None = None
        self.key_spec: KeySpec | None = None  # how this run's files are encrypted

    @property
    def monitor(self) -> QemuMonitor:
        """Where the checkpoint bitmaps are: the VM's qemu, or backupd's daemon."""
        assert self.source is not None
        return self.source.monitor

    async def execute(self) -> Manifest:
        purpose = f"backupd run --vm {self.vm.name}"
        host_lock = host_lock_path(runtime_base(self.config), self.vm.qmp)
        with (
            vm_key(self.vm.encryption) as self.key,  # a bad key file: exit 2, nothing done
            self.repo.lock(purpose=purpose),
            vm_lock(host_lock, self.vm.name, purpose=purpose),
        ):
            checkpoint("after-lock")
            async with self._connected() as source:
                plan = await self._prepare(source)
                backup = self.repo.new_id()
                self._announce(backup, plan)
                checkpoint("after-plan")
                manifest = await self._take(backup, plan)
                self.result.manifest = manifest
                # committed: finish the rotation (milliseconds) even when interrupted now
                await run_to_completion(self._rotate(self.names.name(backup), plan))
                checkpoint("after-rotate")
        self.result.duration = time.monotonic() - self.started
        log.info(
            "%s: backup %s committed: %s copied, %s stored, %s, %s",
            self.vm.name,
            manifest.id,
            human_bytes(manifest.bytes_copied),
            human_bytes(manifest.bytes_stored),
            self.result.consistency,
            manifest.source,
        )
        return manifest

    @contextlib.asynccontextmanager
    async def _connected(self) -> AsyncIterator[Source]:
        """The source of the disks (online or offline), closed on every way out."""
        self.source = await open_source(self.vm, runtime_base(self.config), self._chosen)
        try:
            yield self.source
        finally:
            await run_to_completion(self.source.close())

    async def _prepare(self, source: Source) -> Plan:
        """Remove what a killed run left, find the disks, decide full or incremental."""
        for stale in self.repo.leftovers():
            log.warning("%s: removing %s left by an interrupted run", self.vm.name, stale.name)
            stale.remove()
        private_dir(self.scratch_dir, "scratch_dir")
        await self._finish_merge()
        self.names = CheckpointNames(self.root.identity())
        latest, damaged = self.repo.latest_good()
        for skipped, problem in damaged:
            log.warning(
                "%s: backup %s is damaged, not continued from: %s", self.vm.name, skipped, problem
            )
        owned = set(self.names.candidates(latest.id)) if latest is not None else set()

        def leftover(name: str) -> bool:
            return self.names.owns(name) and name not in owned

        for item in await source.cleanup(leftover, self.scratch_dir):
            log.warning("%s: removed leftover %s", self.vm.name, item)
        checkpoint("after-cleanup")
        self.disks = await source.disks()
        self.result.disks = [d.name for d in self.disks]
        plan = plan_backup(
            self.mode,
            latest,
            self._chain_length(latest),
            self.disks,
            self.vm.max_chain,
            self.names,
            encrypted=self.key is not None,
        )
        if self.key is not None:
            self.key_spec = await asyncio.to_thread(self.key.spec)
            plan = await self._key_opens_parent(plan)
        self.result.plan = plan
        return plan

    async def _key_opens_parent(self, plan: Plan) -> Plan:
        """An incremental of an encrypted VM: the key must open the parent's files (every
        file of a chain has the same key); else exit 2 before anything is written."""
        from backupd.qcow2.encryption import WrongKey, unlock_file

        assert self.key is not None
        if plan.parent is None:
            return plan
        parent = plan.parent
        grand = self.repo.load(parent.parent) if parent.parent else None
        for disk in sorted(parent.disks):
            checked = check_image(self.repo, parent, disk, grand, allow_encryption=True)
            try:
                where = f"backup {parent.id}, disk {disk}"
                await asyncio.to_thread(
                    unlock_file, checked.image.inspectable, self.key.passphrase, where
                )
            except WrongKey as exc:
                raise EncryptionKeyError(
                    f"{exc}: use the key its chain was written with (backupd rekey changes "
                    "it), or --full to start a chain with this one"
                ) from None
            finally:
                checked.image.close()
        return plan

    async def _finish_merge(self) -> None:
        """A prune that was killed is finished first (its backups are being changed)."""
        if not self.repo.unfinished_merge():
            return
        from backupd.merge import finish  # (rare: not imported by every run)

        try:
            with self.repo.readers(exclusive=True, purpose=f"backupd run --vm {self.vm.name}"):
                await finish(self.repo, self.key)
        except BusyError as exc:  # a serve or restore reads the VM's backups now
            log.warning("%s: an interrupted merge waits for the next run: %s", self.vm.name, exc)

    def _chain_length(self, latest: Manifest | None) -> int | None:
        """Incrementals since the full; None for a broken chain (a new full follows)."""
        if latest is None:
            return 0
        try:
            return len(self.repo.chain(latest.id)) - 1
        except RepositoryError as exc:
            log.warning("%s: %s", self.vm.name, exc)
            return None

    def _announce(self, backup: str, plan: Plan) -> None:
        log.info(
            "%s: %s backup %s of %s: %s",
            self.vm.name,
            plan.kind,
            backup,
            ", ".join(d.name for d in self.disks),
            plan.reason,
        )

    async def _take(self, backup: str, plan: Plan) -> Manifest:
        """Point in time, copy, commit; on any failure before the commit nothing stays."""
        assert self.source is not None
        staged = self.repo.stage(backup)
        socket_dir = Path(tempfile.mkdtemp(prefix="nbd-", dir=runtime_base(self.config)))
        session = self.source.session(
            self.disks,
            backup_id=backup,
            bitmap=self.names.name(backup),
            parent_bitmap=plan.parent_bitmap,
            scratch_dir=self.scratch_dir,
            socket_dir=socket_dir,
            quiesce=freeze_window(self.vm, self.source.agent, self._quiesced),
        )
        committed = False
        try:
            async with session as exports:
                checkpoint("after-export")
                if self.hooks.after_point_in_time is not None:
                    await self.hooks.after_point_in_time()
                try:
                    records = await copy_disks(
                        exports, staged, plan, self.vm, self.progress_mode, self.key_spec
                    )
                except BackupFailed as exc:
                    # a view that broke because the scratch area filled up: say so
                    why = session.scratch_full()
                    if why is None:
                        raise
                    raise BackupFailed(f"{exc}; {why}") from exc
                checkpoint("after-copy")
            checkpoint("after-teardown")
            manifest = await self._commit(staged, backup, plan, records)
            committed = True
            return manifest
        finally:
            with contextlib.suppress(OSError):
                socket_dir.rmdir()
            if not committed:
                staged.abort()
                if session.new_bitmap_sent:
                    await self._forget_bitmap(self.names.name(backup))

    def _quiesced(self, frozen: bool) -> None:
        self.result.quiesced = frozen

    def _chosen(self, source: VMState) -> None:
        self.result.source = source

    async def _commit(
        self, staged: Staged, backup: str, plan: Plan, records: list[DiskRecord]
    ) -> Manifest:
        if self.hooks.before_commit is not None:
            await self.hooks.before_commit()
        manifest = Manifest(
            id=backup,
            vm=self.vm.name,
            kind=plan.kind,
            parent=plan.parent.id if plan.parent else None,
            created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            qemu_version=self.monitor.version_text,
            reason=plan.reason,
            quiesced=self.result.quiesced,
            duration=round(time.monotonic() - self.started, 3),
            disks={r.name: r for r in records},
            source=self.result.source or VMState.ONLINE,
        )
        checkpoint("before-manifest")
        staged.commit(manifest)
        checkpoint("after-commit")
        return manifest

    async def _forget_bitmap(self, name: str) -> None:
        """After a failure: drop the new bitmap; the parent's still records every change.
        Runs to its end even while the run is being cancelled."""

        async def forget() -> None:
            for disk in self.disks:
                try:
                    await remove_bitmap(self.monitor, disk.node, name)
                except QemuError as exc:
                    log.warning(
                        "could not remove bitmap %s on %s (%s); the next run removes it",
                        name,
                        disk.name,
                        exc,
                    )

        await run_to_completion(forget())

    async def _rotate(self, keep: str, plan: Plan) -> None:
        """After the commit only the new bitmap of this repository keeps recording (and the
        parent's, when it had the name from before repository ids, goes too)."""
        for disk in self.disks:
            for bitmap in disk.bitmaps:
                name = bitmap.name
                if name == keep or not (self.names.owns(name) or name == plan.parent_bitmap):
                    continue
                try:
                    await remove_bitmap(self.monitor, disk.node, name)
                    checkpoint("mid-rotate")
                except QemuError as exc:
                    log.warning(
                        "%s: could not remove old bitmap %s on %s (%s); the next run removes it",
                        self.vm.name,
                        name,
                        disk.name,
                        exc,
                    )


async def run_backup(
    config: Config,
    vm: VMConfig,
    mode: Mode = Mode.AUTO,
    *,
    progress_mode: ProgressMode = ProgressMode.NONE,
    hooks: RunHooks | None = None,
    result: RunResult | None = None,
) -> Manifest:
    """Take one backup of ``vm``; returns the committed manifest."""
    run = BackupRun(config, vm, mode, progress_mode=progress_mode, hooks=hooks, result=result)
    return await run.execute()
