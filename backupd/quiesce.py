"""Quiescing a VM's file systems around the point in time, and never leaving them frozen.

:func:`open_agent` connects to the guest agent at the start of a run and first thaws a
guest that an interrupted run (or another agent client) left frozen.  :func:`frozen` is
the freeze window: once ``guest-fsfreeze-freeze`` was *sent*, a thaw is sent on every
way out (error, timeout, cancel, SIGINT, SIGTERM), shielded from cancellation, and the
whole window, freeze included, is capped by ``freeze_timeout``.  qemu-ga runs the
commands of one channel in order, so a thaw sent while a freeze is still in progress
takes effect right after it.

Without an agent (or when it does not answer) the backup is crash-consistent, and a run
fails instead when the VM's configuration has ``require_quiesce: true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from backupd.config import VMConfig
from backupd.errors import BackupFailed, QemuError
from backupd.qemu.guest_agent import SYNC_TIMEOUT, GuestAgent
from backupd.shield import run_to_completion

log = logging.getLogger("backupd.agent")

#: a thaw waits this much longer than the freeze window (a freeze still in progress ends first)
THAW_GRACE = 15.0


async def _connect(path: str, vm: str, timeout: float) -> GuestAgent:
    agent = GuestAgent(path, timeout=min(timeout, SYNC_TIMEOUT))
    try:
        await agent.connect()
        if await agent.status() == "frozen":
            log.warning(
                "%s: the guest's file systems were FROZEN (left so by an interrupted run or "
                "another agent client); thawing them now",
                vm,
            )
            agent.freeze_sent = True
            await agent.thaw(timeout=agent.timeout + THAW_GRACE)
            log.warning("%s: the guest's file systems are thawed", vm)
    except BaseException:
        await run_to_completion(agent.close())
        raise
    return agent


async def open_agent(vm: VMConfig) -> GuestAgent | None:
    """The VM's guest agent, or None (crash-consistent), or BackupFailed when the VM
    requires quiescing and its agent cannot be had."""
    if not vm.guest_agent:
        if vm.require_quiesce:
            raise BackupFailed("require_quiesce is set but no guest_agent is configured")
        return None
    try:
        return await _connect(vm.guest_agent, vm.name, vm.timeout)
    except QemuError as exc:
        if vm.require_quiesce:
            raise BackupFailed(f"{exc}; require_quiesce is set, so no backup was taken") from None
        log.warning("%s: %s; the backup will be crash-consistent", vm.name, exc)
        return None


async def _thaw_always(agent: GuestAgent, vm: str, window: float) -> None:
    if not agent.freeze_sent:
        return
    try:
        await agent.thaw(timeout=window + THAW_GRACE)
        log.info("%s: guest file systems thawed", vm)
    except QemuError as exc:
        log.error(
            "%s: COULD NOT THAW the guest's file systems (%s): check with "
            "guest-fsfreeze-status; the next backupd run thaws them",
            vm,
            exc,
        )


@contextlib.asynccontextmanager
async def frozen(agent: GuestAgent, vm: str, *, window: float) -> AsyncIterator[int]:
    """Freeze for the duration of the ``async with`` body, at most ``window`` seconds in
    all (freeze included); yields the number of frozen file systems (0 when the freeze
    failed, after a thaw).  A window that runs out thaws and fails the run."""
    count = 0
    deadline = asyncio.timeout(window)
    try:
        async with deadline:
            try:
                count = await agent.freeze(timeout=window)
            except QemuError as exc:
                log.warning("%s: the guest agent did not freeze the file systems (%s)", vm, exc)
                await run_to_completion(_thaw_always(agent, vm, window))
            else:
                log.info("%s: guest file systems frozen (%d)", vm, count)
            yield count
    except TimeoutError:
        if deadline.expired():
            raise BackupFailed(
                f"the guest's file systems stayed frozen longer than freeze_timeout "
                f"({window:g} s); they were thawed and this run failed"
            ) from None
        raise
    finally:
        await run_to_completion(_thaw_always(agent, vm, window))


Window = Callable[[], AbstractAsyncContextManager[object]]


def freeze_window(
    vm: VMConfig, agent: GuestAgent | None, quiesced: Callable[[bool], None]
) -> Window:
    """The point in time's surroundings for a run: frozen file systems with an agent
    (``quiesced`` is told whether they were), nothing without one."""

    @contextlib.asynccontextmanager
    async def window() -> AsyncIterator[None]:
        if agent is None:
            yield
            return
        async with frozen(agent, vm.name, window=vm.freeze_timeout) as count:
            quiesced(count > 0)
            if count == 0 and vm.require_quiesce:
                raise BackupFailed(
                    "the guest's file systems could not be frozen and require_quiesce is set"
                )
            yield

    return window
