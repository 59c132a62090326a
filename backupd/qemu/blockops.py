"""The QMP block operations backupd undoes things with, each safe to repeat.

Removing what is not there is done, not an error: a teardown after a half-done setup,
or a cleanup after a killed run, meets things that were never added or are gone
already.  :func:`refusal` is the one place that tells "there is no such thing" from a
refusal; every other refusal reaches the caller as :class:`QemuCommandError`.

What qemu 7.2 answers when the thing named is missing (checked with the real qemu)::

    block-job-cancel           DeviceNotActive  Block job 'X' not found
    qom-set                    DeviceNotFound   Device '/machine/peripheral/X' not found
    blockdev-del               GenericError     Failed to find node with node-name='X'
    block-export-del           GenericError     Export 'X' is not found
    block-dirty-bitmap-remove  GenericError     Dirty bitmap 'X' not found / Node 'X' not found
    job-dismiss                GenericError     Job not found
    nbd-server-stop            GenericError     NBD server not running

An image that another process has open (qemu's image locking, ``blockdev-add``)::

    blockdev-add               GenericError     Failed to get "write" lock
                                                Failed to get shared "write" lock

A refusal, by contrast: ``Node X is in use``, ``Bitmap 'X' is currently in use by
another operation and cannot be used``, ``Permission conflict on node ...``.
"""

from __future__ import annotations

import logging
import re
from enum import Enum
from typing import Any

from backupd.errors import QemuCommandError
from backupd.qemu.qmp import QemuMonitor

log = logging.getLogger("backupd.qemu")

#: how long a removal waits for the event that says it is complete
TEARDOWN_TIMEOUT = 30.0

#: the error classes qemu uses for "no such block job" and "no such device"
_MISSING_CLASSES = frozenset({"DeviceNotActive", "DeviceNotFound"})
#: qemu says GenericError for a missing node, export, bitmap, job or NBD server: only
#: the description tells; "No export"/"No active" are the words of older qemu
_MISSING_WORDS = ("not found", "Failed to find node", "not running", "No export", "No active")
#: qemu's image locking: 'Failed to get "write" lock', 'Failed to get shared "write" lock'
_LOCKED = re.compile(r'Failed to get (shared )?"[a-z ]+" lock')


class Refusal(Enum):
    """Why qemu refused a command, as far as a caller can act on it."""

    MISSING = "missing"  # the thing the command names does not exist
    EXISTS = "exists"  # it exists already (e.g. "NBD server already running")
    LOCKED = "locked"  # another process holds the image's lock (blockdev-add of a file)
    OTHER = "other"


def refusal(exc: QemuCommandError) -> Refusal:
    """The one place that reads qemu's error descriptions: by the error class where qemu
    gives a specific one, else (GenericError) by the words of the description."""
    if exc.error_class in _MISSING_CLASSES:
        return Refusal.MISSING
    if exc.error_class != "GenericError":
        return Refusal.OTHER  # e.g. CommandNotFound: "The command X has not been found"
    if any(words in exc.description for words in _MISSING_WORDS):
        return Refusal.MISSING
    if "already running" in exc.description:
        return Refusal.EXISTS
    if _LOCKED.search(exc.description):
        return Refusal.LOCKED
    return Refusal.OTHER


async def _execute_unless_missing(
    monitor: QemuMonitor, command: str, arguments: dict[str, Any] | None = None
) -> bool:
    """Run ``command``; False when what it names is not there (nothing was done)."""
    try:
        await monitor.execute(command, arguments)
    except QemuCommandError as exc:
        if refusal(exc) is Refusal.MISSING:
            return False
        raise
    return True


async def delete_export(monitor: QemuMonitor, export_id: str) -> None:
    """Remove an NBD export, dropping its clients, and wait until qemu has let go of its
    node and bitmap (``BLOCK_EXPORT_DELETED``: until then the bitmap is busy)."""
    with monitor.listen("BLOCK_EXPORT_DELETED", lambda e: e["data"].get("id") == export_id) as ev:
        args = {"id": export_id, "mode": "hard"}
        if await _execute_unless_missing(monitor, "block-export-del", args):
            await ev.get(TEARDOWN_TIMEOUT)


async def cancel_job(monitor: QemuMonitor, job: str) -> None:
    """Cancel a block job and wait for it to end (a ``sync=none`` job ends only so)."""
    accept = lambda e: e["data"].get("device") == job  # noqa: E731
    with monitor.listen(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"), accept) as ev:
        args = {"device": job, "force": True}
        if not await _execute_unless_missing(monitor, "block-job-cancel", args):
            return
        await ev.get(TEARDOWN_TIMEOUT)
    # with auto-dismiss the job is gone; dismiss it in case it concluded otherwise
    try:
        await monitor.execute("job-dismiss", {"id": job})
    except QemuCommandError as exc:
        log.debug("job-dismiss %s: %s", job, exc.description)


async def delete_node(monitor: QemuMonitor, node: str) -> None:
    """Remove a node that backupd added with ``blockdev-add``."""
    await _execute_unless_missing(monitor, "blockdev-del", {"node-name": node})


async def remove_bitmap(monitor: QemuMonitor, node: str, name: str) -> None:
    """Remove a dirty bitmap (a busy one is refused: wait for its export to go first)."""
    await _execute_unless_missing(
        monitor, "block-dirty-bitmap-remove", {"node": node, "name": name}
    )


async def stop_nbd_server(monitor: QemuMonitor) -> None:
    """Stop qemu's NBD server; qemu removes the exports still on it."""
    await _execute_unless_missing(monitor, "nbd-server-stop")


def qom_path(device: str) -> str:
    """The QOM path of a guest device given by id or by path."""
    return device if device.startswith("/") else f"/machine/peripheral/{device}"


async def redirect(monitor: QemuMonitor, device: str, node: str) -> None:
    """Point a guest device (by QOM path) at ``node``.

    Never to the node it has already: qemu 7.2 aborts on that (``bdrv_replace_child_noperm:
    Assertion `old_bs != new_bs' failed``), killing the guest.  :func:`put_back` checks.
    """
    await monitor.execute("qom-set", {"path": device, "property": "drive", "value": node})


async def device_root(monitor: QemuMonitor, device: str) -> str | None:
    """The node a guest device (by QOM path) writes to now; None when it has none."""
    blocks: list[dict[str, Any]] = await monitor.execute("query-block")
    for block in blocks:
        qdev = str(block.get("qdev") or "")
        if qdev and qom_path(qdev) == qom_path(device):
            inserted = block.get("inserted") or {}
            root = inserted.get("node-name")
            return str(root) if root else None
    return None


async def put_back(monitor: QemuMonitor, device: str, filter_node: str, original: str) -> bool:
    """Point ``device`` back at ``original`` if it writes through ``filter_node`` now;
    False when it does not (the redirect never happened, or was undone already)."""
    if await device_root(monitor, device) != filter_node:
        return False
    await redirect(monitor, device, original)
    return True


async def filter_child(monitor: QemuMonitor, node: str) -> str | None:
    """The ``file`` child of a filter node, from qemu's block graph (debug interface)."""
    try:
        graph = await monitor.execute("x-debug-query-block-graph")
    except QemuCommandError:
        return None
    names = {n["id"]: n.get("name", "") for n in graph.get("nodes", [])}
    parent = next((i for i, name in names.items() if name == node), None)
    for edge in graph.get("edges", []):
        if edge.get("parent") == parent and edge.get("name") == "file":
            child = names.get(edge.get("child"))
            return str(child) if child else None
    return None
