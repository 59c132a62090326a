"""Quiescing through the qemu guest agent: fs-freeze just before the point in time,
thaw right after.  A missing or unresponsive agent is not fatal: the caller logs a
warning and the backup goes on crash-consistent."""

from __future__ import annotations

import logging
import random

from backupd.errors import QemuError
from backupd.qemu.qmp import QemuMonitor

log = logging.getLogger("backupd.agent")


class GuestAgent:
    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._monitor: QemuMonitor | None = None
        self.frozen = False

    async def freeze(self) -> int:
        """Connect, sync and freeze; returns the number of frozen file systems."""
        monitor = QemuMonitor(self.path, timeout=self.timeout, agent=True)
        await monitor.connect()
        self._monitor = monitor
        token = random.getrandbits(62)
        reply = await monitor.execute("guest-sync", {"id": token}, timeout=self.timeout)
        if reply != token:
            raise QemuError("guest agent answered guest-sync with the wrong token")
        count = int(await monitor.execute("guest-fsfreeze-freeze", timeout=60.0))
        self.frozen = count > 0
        return count

    async def thaw(self) -> None:
        """Thaw (always safe to call; never raises)."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        try:
            if self.frozen:
                await monitor.execute("guest-fsfreeze-thaw", timeout=60.0)
        except QemuError as exc:
            log.error("guest agent: thaw failed: %s", exc)
        finally:
            self.frozen = False
            await monitor.close()
