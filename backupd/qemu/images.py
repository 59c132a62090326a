"""A VM's image files, opened in backupd's qemu-storage-daemon (offline backups).

Each image becomes one node, ``backupd-image-<n>``, opened with the format the
configuration gives (never probed): qcow2 read-write, because the checkpoint bitmaps
are changed in it, with ``block-dirty-bitmap-*`` on the daemon, the way qemu changes
them; raw read-only (a raw image holds no bitmaps).

Opening takes qemu's image lock (write, or shared for a read-only node), which a qemu
that has the image open for writing holds: the open is then refused before anything
is read from or written to the file (checked with qemu 7.2: the file is byte-identical
afterwards).  That refusal is how a running VM whose QMP socket did not answer is told
from one that is shut down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backupd.errors import ImageLockedError, QemuCommandError, QemuError
from backupd.qemu.blockops import Refusal, refusal
from backupd.qemu.qmp import QemuMonitor

IMAGE_PREFIX = "backupd-image-"


def image_node(index: int) -> str:
    """The node of the ``index``-th image of a run (node names are short: no disk name)."""
    return f"{IMAGE_PREFIX}{index}"


def _options(node: str, path: Path, fmt: str) -> dict[str, Any]:
    protocol = {"driver": "file", "filename": str(path)}
    if fmt == "raw":
        return {"driver": "raw", "node-name": node, "read-only": True, "file": protocol}
    return {"driver": fmt, "node-name": node, "read-only": False, "file": protocol}


async def open_image(monitor: QemuMonitor, node: str, disk: str, path: Path, fmt: str) -> str:
    """Open the image ``path`` of ``disk`` as ``node``; ImageLockedError when another
    process (a running qemu) has it open for writing."""
    try:
        await monitor.execute("blockdev-add", _options(node, path, fmt))
    except QemuCommandError as exc:
        if refusal(exc) is Refusal.LOCKED:
            raise ImageLockedError(
                f"image {path} of disk {disk} is locked by another process ({exc.description})"
            ) from None
        raise QemuError(f"cannot open image {path} of disk {disk}: {exc.description}") from None
    return node
