"""The VM being restored into: its qemu (over QMP), the block node that has the output
open, and the copy job that pulls every cluster of the served point into the output.

The copy is qemu's ``block-stream`` on that node, with no base: qemu copies every
cluster the overlay lacks from its backing file (the served point) into the overlay,
never one the guest has written since (those are the overlay's own), and when it has
them all it rewrites the overlay's header without a backing file and lets go of the
served point.  The job runs inside the VM's qemu: backupd only starts it and watches
it (``query-jobs``), so a backupd that is killed stops nothing.  It is auto-dismissed
(qemu's default): its end, with the error it may have ended with, is its
``BLOCK_JOB_COMPLETED`` event; a job that ended while backupd was away has left the
overlay complete (no backing file) or still backed (the next copy goes on from there).

Why not ``blockdev-mirror``: a mirror copies the disk into a *second* file and needs a
switch-over at the end (``block-job-complete``), after which the VM runs on a file its
command line does not name; its progress lives only in qemu's memory, so a VM that is
stopped mid-way starts the copy again from nothing.  A stream fills the very file the
VM was started with: a stopped VM restarts on it with everything copied so far, and
the next stream only fetches what is still missing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backupd.errors import BackupdError, QemuError
from backupd.qemu.qmp import QemuMonitor

POLL = 0.5


class TargetUnreachable(BackupdError):
    """No qemu answered on the target QMP socket with the output open, in time."""


class VMGone(BackupdError):
    """The VM's qemu closed its monitor (stopped, crashed) before the copy was complete."""


class CopyFailed(BackupdError):
    """qemu ended the copy job with an error (a read from the served point failed)."""


@dataclass(frozen=True, slots=True)
class Node:
    """The block node of the VM that has the output open."""

    name: str
    backing: str | None
    read_only: bool


def _same_file(name: object, output: os.stat_result) -> bool:
    if not isinstance(name, str) or not name.startswith("/"):
        return False
    try:
        info = os.stat(name)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (output.st_dev, output.st_ino)


async def find_node(monitor: QemuMonitor, output: Path) -> Node | None:
    """The qcow2 node whose image file is ``output`` (the same file, by device and
    inode: qemu may name it by another path)."""
    wanted = os.stat(output)
    nodes: list[dict[str, Any]] = await monitor.execute("query-named-block-nodes", {"flat": True})
    for node in nodes:
        if node.get("drv") == "qcow2" and _same_file(node.get("file"), wanted):
            backing = node.get("backing_file")
            return Node(
                str(node["node-name"]),
                str(backing) if backing else None,
                bool(node.get("ro", False)),
            )
    return None


async def _find_on(address: str, output: Path, deadline: float) -> tuple[QemuMonitor, Node]:
    """Connect to ``address`` and look for the node until ``deadline``; the connected
    monitor with the node, or QemuError (the monitor is closed then)."""
    loop = asyncio.get_running_loop()
    monitor = QemuMonitor(address, timeout=30.0)
    try:
        await monitor.connect()
        while True:
            node = await find_node(monitor, output)
            if node is not None:
                return monitor, node
            if loop.time() >= deadline:
                raise TargetUnreachable(
                    f"qemu at {address} has not opened {output} as a block node (its "
                    "-blockdev must name this file)"
                )
            await asyncio.sleep(POLL)
    except BaseException:
        await monitor.close()
        raise


async def wait_for_target(address: str, output: Path, wait: float) -> tuple[QemuMonitor, Node]:
    """Wait up to ``wait`` seconds for a qemu on ``address`` with ``output`` open as a
    block node; TargetUnreachable saying what was found instead."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            return await _find_on(address, output, deadline)
        except TargetUnreachable:
            raise
        except QemuError as exc:  # no socket yet, refused, busy, or qemu went away
            why = str(exc)
        if loop.time() >= deadline:
            raise TargetUnreachable(f"target VM unreachable within {wait:g} s: {why}")
        await asyncio.sleep(POLL)


async def _jobs(monitor: QemuMonitor) -> dict[str, dict[str, Any]]:
    jobs: list[dict[str, Any]] = await monitor.execute("query-jobs")
    return {str(job["id"]): job for job in jobs}


async def _start(monitor: QemuMonitor, node: Node, job: str, speed: int | None) -> None:
    """Adopt the copy job ``job`` if it runs (a killed backupd's), else start it;
    ``speed`` (bytes/s, 0 = unlimited) is set when given."""
    if job not in await _jobs(monitor):
        arguments: dict[str, Any] = {"job-id": job, "device": node.name, "on-error": "report"}
        if speed is not None:
            arguments["speed"] = speed
        await monitor.execute("block-stream", arguments)
    elif speed is not None:
        await monitor.execute("block-job-set-speed", {"device": job, "speed": speed})


async def copy(
    monitor: QemuMonitor,
    node: Node,
    job: str,
    speed: int | None,
    progress: Callable[[int, int], None],
) -> None:
    """Run the copy job ``job`` on ``node`` to its end (starting it, or adopting the one
    that runs) and watch it: PROGRESS gets (done, total) bytes as qemu counts them;
    CopyFailed with qemu's error when it fails, BackupdError when it is cancelled.

    The job is auto-dismissed, as qemu does by default: its end is read from its
    event.  (qemu 7.2 crashes on ``query-named-block-nodes`` while an ended stream job
    waits to be dismissed, so no such job is ever left behind for any client to meet.)
    A job that vanished without an event ends the watch: the caller looks at the node.
    """
    names = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "SHUTDOWN")
    shutdown = False

    def ours(event: Mapping[str, Any]) -> bool:
        return bool(event["event"] == "SHUTDOWN" or event["data"].get("device") == job)

    with monitor.listen(names, ours) as events:
        await _start(monitor, node, job, speed)
        while True:
            current = (await _jobs(monitor)).get(job)
            if current is not None:
                done = int(current.get("current-progress", 0))
                progress(done, int(current.get("total-progress", 0)))
            try:
                event = await events.get(POLL)
            except QemuError:  # no event within POLL: still running, or gone silently
                if current is None:
                    return
                continue
            if event["event"] == "SHUTDOWN":  # qemu cancels the job when it exits
                shutdown = True
                continue
            if event["event"] == "BLOCK_JOB_CANCELLED":
                if shutdown:
                    raise VMGone("it shut down")
                raise BackupdError("the copy job was cancelled in qemu (--resume starts it again)")
            error = event["data"].get("error")
            if error:
                raise CopyFailed(f"qemu stopped the copy: {error}")
            data = event["data"]
            progress(int(data.get("offset", 0)), int(data.get("len", 0)))
            return
