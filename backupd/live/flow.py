"""A live restore from start to end, and what is left when it stops half-way.

Start (``restore --live``):

1. the point is served by a detached qemu-storage-daemon (:mod:`backupd.live.served`);
2. the output is made as a qcow2 overlay over it (:mod:`backupd.live.overlay`) and the
   ``-blockdev`` option that opens it is printed;
3. backupd waits for a qemu on the target QMP socket with that file open
   (:mod:`backupd.live.target`): the operator starts the VM meanwhile, and it boots at
   once, reading from the served point;
4. the copy job runs in that qemu while the guest runs, with progress;
5. when it is complete the output has no backing file; it is synced, the served point
   is stopped and the state removed.

``--resume`` takes up at step 3 from the state folder, first serving the point again
when its daemon is gone (a reboot).

What a failure or a signal leaves depends on how far the start got (:class:`Phase`):
before the output exists, nothing (the served point is stopped); while waiting, nothing
either, unless a qemu already opened the output or wrote to it; from the moment a qemu
runs on the output, everything stays: the served point (the guest reads from it), the
copy job in qemu (it goes on), the state; the log says how to ``--resume``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from backupd.errors import BackupdError, NotFoundError, QemuCommandError, QemuError, UsageError
from backupd.keys import Key
from backupd.live import state as live_state
from backupd.live.overlay import backing_file, blockdev_option, create, in_use, node_name
from backupd.live.served import ServedPoint
from backupd.live.state import LiveState, StateError
from backupd.live.target import Node, VMGone, copy, find_node, wait_for_target
from backupd.logs import human_bytes
from backupd.manifest import Manifest
from backupd.progress import Progress, progress_mode
from backupd.qemu.qmp import QemuMonitor
from backupd.repository import VMRepository
from backupd.shield import run_to_completion

log = logging.getLogger("backupd")


class Phase(Enum):
    PREPARING = "preparing"  # no output yet: nothing can use the served point
    WAITING = "waiting"  # the output exists, no qemu seen on it yet
    COPYING = "copying"  # a qemu runs on the output: it depends on the served point


@dataclass(frozen=True, slots=True)
class LiveOptions:
    output: Path  # absolute
    target: str  # the VM's QMP socket
    wait: float
    speed: int | None  # bytes/s, 0 unlimited, None: qemu's default (or as it is)
    quiet: bool
    config: Path  # for the --resume line


def _identity(path: Path) -> tuple[int, int, int]:
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns


class LiveRestore:
    """One live restore into ``state.output``."""

    def __init__(self, state: LiveState, options: LiveOptions) -> None:
        self.state = state
        self.options = options
        self.output = Path(state.output)
        self.served = ServedPoint(state.folder, Path(state.socket))
        self.phase = Phase.COPYING
        #: the overlay as it was made by this start (None for a resume: never undone)
        self.fresh: tuple[int, int, int] | None = None
        self._control: int | None = None

    def take_control(self) -> None:
        """Be the one backupd that drives this live restore (BusyError naming the one
        that does, when another runs: a start, or a resume given twice)."""
        self._control = live_state.take_control(self.output)

    def release(self) -> None:
        if self._control is not None:
            os.close(self._control)
            self._control = None

    @property
    def holder(self) -> str:
        return f"backupd restore --live into {self.output}, served by qemu-storage-daemon"

    def resume_line(self) -> str:
        return (
            f"backupd -c {self.options.config} restore --live --resume "
            f"--output {self.output} --target-qmp {self.options.target}"
        )

    async def start(self, repo: VMRepository, manifest: Manifest, key: Key | None = None) -> None:
        """Serve, make the output, wait for the VM, copy (steps 1-5); ``key``: the VM's
        encryption key (its backups are encrypted, the output is not)."""
        self.phase = Phase.PREPARING
        try:
            pid = await self.served.start(repo, manifest, self.state.disk, self.holder, key)
            partial = self.state.folder / live_state.OVERLAY
            await create(partial, self.output, self.state.uri)
            self.fresh = _identity(self.output)
            self.phase = Phase.WAITING
            self._announce(manifest, pid)
            await self.copy()
        except BaseException as exc:
            await run_to_completion(self.aftermath(exc))
            raise

    async def resume(
        self, repo: VMRepository | None, manifest: Manifest | None, key: Key | None = None
    ) -> None:
        """Serve again if the daemon is gone (``repo`` and ``manifest`` given), then wait
        for the VM and copy (steps 3-5)."""
        try:
            if repo is not None and manifest is not None:
                pid = await self.served.start(repo, manifest, self.state.disk, self.holder, key)
                log.info("serving backup %s again (qemu-storage-daemon pid %d)", manifest.id, pid)
            if backing_file(self.output) is None:  # complete while backupd was away
                await self._finish()
                return
            await self.copy()
        except BaseException as exc:
            await run_to_completion(self.aftermath(exc))
            raise

    def _announce(self, manifest: Manifest, pid: int) -> None:
        node = node_name(self.state.disk)
        option = blockdev_option(node, self.output)
        print(option, flush=True)
        log.info(
            "serving backup %s of vm %s, disk %s (%s), to %s through %s "
            "(qemu-storage-daemon pid %d)",
            manifest.id,
            self.state.vm,
            self.state.disk,
            human_bytes(self.state.size),
            self.output,
            self.state.uri,
            pid,
        )
        log.info(
            "start the VM on it now (it boots at once): qemu-system-x86_64 ... -qmp "
            "unix:%s,server=on,wait=off %s -device virtio-blk-pci,drive=%s",
            self.options.target,
            option,
            node,
        )
        log.info("waiting up to %gs for that qemu at %s", self.options.wait, self.options.target)

    async def copy(self) -> None:
        """Wait for the VM with the output open, copy every cluster, finish."""
        address = self.options.target
        monitor, node = await wait_for_target(address, self.output, self.options.wait)
        self.phase = Phase.COPYING
        try:
            await self._stream(monitor, node)
        except QemuCommandError:
            raise
        except (QemuError, VMGone) as exc:
            raise VMGone(
                f"the VM's qemu at {address} went away before the copy was complete ({exc})"
            ) from None
        finally:
            await monitor.close()
        await self._finish()

    async def _stream(self, monitor: QemuMonitor, node: Node) -> None:
        if node.backing is not None:  # (else complete: the job ended while backupd was away)
            if node.backing != self.state.uri:
                raise BackupdError(
                    f"qemu opened {self.output} with backing file {node.backing}, "
                    f"not the served point {self.state.uri}"
                )
            if node.read_only:
                raise BackupdError(f"qemu opened {self.output} read-only: the copy writes it")
            log.info(
                "qemu at %s has %s open (node %s): copying every cluster into it while "
                "the guest runs",
                self.options.target,
                self.output,
                node.name,
            )
            await self._copy(monitor, node)
            after = await find_node(monitor, self.output)
            if after is None or after.backing is not None:
                raise BackupdError(
                    "the copy job ended before the copy was complete (cancelled in qemu?)"
                )
        if backing_file(self.output) is not None:
            raise BackupdError(
                f"qemu says the copy is complete, but {self.output} still names a backing file"
            )

    async def _copy(self, monitor: QemuMonitor, node: Node) -> None:
        mode = progress_mode(self.options.quiet)
        label = f"{self.state.vm}/{self.state.disk} (live)"
        bar = Progress(label, self.state.size, mode=mode) if mode != "none" else None
        done = 0

        def progress(current: int, total: int) -> None:
            nonlocal done
            if bar is not None:
                bar.update(current - done)
            done = current

        try:
            await copy(monitor, node, self.state.job, self.options.speed, progress)
        finally:
            if bar is not None:
                bar.close()

    async def _finish(self) -> None:
        """The output holds every cluster: make it durable, stop serving, forget."""
        fd = os.open(self.output, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
        await self.served.stop()
        live_state.remove(self.output, Path(self.state.socket))
        log.info(
            "live restore of %s/%s from backup %s complete: %s has every cluster and no "
            "backing file; the served point is stopped",
            self.state.vm,
            self.state.disk,
            self.state.backup,
            self.output,
        )

    def _untouched(self) -> bool:
        """The output made by this start is as it was made, and no process has it open."""
        try:
            same = self.fresh is not None and _identity(self.output) == self.fresh
        except FileNotFoundError:
            return True
        return same and not in_use(self.output)

    async def aftermath(self, exc: BaseException) -> None:
        """Undo what nothing can depend on yet; otherwise leave it all and say how to go on."""
        if self.phase is Phase.PREPARING or (self.phase is Phase.WAITING and self._untouched()):
            if self.phase is Phase.WAITING:
                with contextlib.suppress(FileNotFoundError):
                    self.output.unlink()
                log.warning(
                    "nothing was restored: %s is removed, the backup no longer served", self.output
                )
            await self.served.stop()
            live_state.remove(self.output, Path(self.state.socket))
            return
        if isinstance(exc, Exception | asyncio.CancelledError):
            pid = self.served.pid()
            served = (
                f"the backup stays served (qemu-storage-daemon pid {pid})"
                if pid is not None
                else "the backup is NOT served any more (--resume serves it again)"
            )
            if self.phase is Phase.WAITING:
                served = f"a process has {self.output} open: {served}"
            elif isinstance(exc, asyncio.CancelledError):
                served = f"the copy goes on in the VM's qemu; {served}"
            log.warning("%s; finish with: %s", served, self.resume_line())


def clear_leftover(output: Path) -> None:
    """Refuse to start over a live restore in progress; the state of a start killed
    before it made the output is removed (by the caller, once its daemon is stopped)."""
    if os.path.lexists(output):
        more = ""
        if os.path.lexists(live_state.state_folder(output)):
            more = " (a live restore into it is in progress: --resume it)"
        raise UsageError(f"{output} exists; a live restore writes a new file{more}")
    if not output.parent.is_dir():
        raise UsageError(f"folder {output.parent} does not exist")


async def remove_leftover(output: Path) -> None:
    """A state folder without its output: a start was killed before it made the output,
    so nothing can use its served point: stop it and remove the folder."""
    folder = live_state.state_folder(output)
    if not os.path.lexists(folder):
        return
    live_state.check_folder(folder)
    control = live_state.take_control(output)
    try:
        try:
            old = live_state.load(output)
        except StateError:
            old = None
        socket = Path(old.socket) if old is not None else None
        await ServedPoint(folder, socket or folder / "nbd.sock").stop()
        live_state.remove(output, socket)
    finally:
        os.close(control)
    log.warning("removed what an interrupted live restore into %s had left", output)


def check_disk(manifest: Manifest, disk: str, vm: str) -> int:
    """The size of ``disk`` in the backup (NotFoundError naming the disks it has)."""
    if disk not in manifest.disks:
        known = ", ".join(sorted(manifest.disks))
        raise NotFoundError(
            f"backup {manifest.id} of vm {vm} has no disk {disk!r} (disks: {known})"
        )
    return manifest.disks[disk].virtual_size
