"""Recovery: what a killed run left in qemu and in the scratch folder, found and removed
at the start of the next run.

qemu tells most of it by name (exports, jobs and nodes with backupd's prefixes, a guest
device whose root is backupd's filter); the state file tells the rest: that the VM was
paused by the run, and which node each redirected guest device had before.  Top down:
the exports (then the NBD server, if nothing else is exported), the jobs, the views, the
guest devices back onto their disks, the filters, the scratch nodes, the stray bitmaps,
the scratch files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backupd.bitmaps import EXPORT_BITMAP
from backupd.errors import QemuCommandError, QemuError
from backupd.qemu.blockops import (
    cancel_job,
    delete_export,
    delete_node,
    filter_child,
    qom_path,
    redirect,
    remove_bitmap,
)
from backupd.qemu.fleece.names import (
    ACCESS_PREFIX,
    CBW_PREFIX,
    EXPORT_PREFIX,
    JOB_PREFIX,
    SCRATCH_PREFIX,
)
from backupd.qemu.fleece.scratch import SessionState, leftover_files, read_state, remove_state
from backupd.qemu.inventory import BlockState, block_state, named_nodes
from backupd.qemu.qmp import QemuMonitor


async def cleanup_leftovers(
    monitor: QemuMonitor,
    is_leftover: Callable[[str], bool],
    scratch_dir: Path,
    graph: BlockState | None = None,
) -> list[str]:
    """Undo what a killed run left in qemu and in the scratch folder; returns what was
    removed.  Bitmaps for which ``is_leftover`` says so are removed (those of this
    repository that no committed backup owns); the export bitmap never is.

    The nodes, devices and bitmaps are read once (``graph``, or asked now): removing
    one of them changes nothing else of what is looked for, and removing what is gone
    already is no error."""
    state = read_state(scratch_dir)
    graph = graph if graph is not None else await block_state(monitor)
    removed: list[str] = []
    removed += await _resume_if_paused(monitor, state)
    removed += await _remove_exports(monitor)
    removed += await _cancel_jobs(monitor)
    removed += await _delete_nodes(monitor, graph.nodes, ACCESS_PREFIX)
    removed += await _put_devices_back(monitor, graph.blocks, state)
    removed += await _delete_nodes(monitor, graph.nodes, CBW_PREFIX)
    removed += await _delete_nodes(monitor, graph.nodes, SCRATCH_PREFIX)
    removed += await remove_stray_bitmaps(monitor, is_leftover, graph.nodes)
    removed += remove_scratch_leftovers(scratch_dir)
    return removed


def remove_scratch_leftovers(scratch_dir: Path) -> list[str]:
    """The scratch files and the state file a killed run left."""
    removed = []
    for leftover in leftover_files(scratch_dir):
        leftover.unlink()
        removed.append(f"scratch file {leftover.name}")
    remove_state(scratch_dir)
    return removed


async def _resume_if_paused(monitor: QemuMonitor, state: SessionState) -> list[str]:
    """A killed run may have left the vCPUs stopped; resume them only if they still are
    (a VM paused since then by someone else was not, as far as the state file says)."""
    if not state.paused:
        return []
    status = await monitor.execute("query-status")
    if status.get("status") != "paused":
        return []
    await monitor.execute("cont")
    return ["pause of the VM (resumed)"]


async def _remove_exports(monitor: QemuMonitor) -> list[str]:
    """backupd's exports; then the NBD server, when no other export is left on it."""
    removed = []
    for export in await monitor.execute("query-block-exports"):
        export_id = str(export.get("id", ""))
        if export_id.startswith(EXPORT_PREFIX):
            await delete_export(monitor, export_id)
            removed.append(f"export {export_id}")
    if removed and not await monitor.execute("query-block-exports"):
        with contextlib.suppress(QemuCommandError):
            await monitor.execute("nbd-server-stop")
    return removed


async def _cancel_jobs(monitor: QemuMonitor) -> list[str]:
    removed = []
    for job in await monitor.execute("query-block-jobs"):
        job_id = str(job.get("device", ""))
        if job_id.startswith(JOB_PREFIX):
            await cancel_job(monitor, job_id)
            removed.append(f"job {job_id}")
    return removed


async def _delete_nodes(
    monitor: QemuMonitor, nodes: list[dict[str, Any]], prefix: str
) -> list[str]:
    removed = []
    for info in nodes:
        node = str(info.get("node-name", ""))
        if node.startswith(prefix):
            await delete_node(monitor, node)
            removed.append(f"node {node}")
    return removed


async def _put_devices_back(
    monitor: QemuMonitor, blocks: list[dict[str, Any]], state: SessionState
) -> list[str]:
    """Every guest device that writes through backupd's filter goes back onto the node
    it had: the one the state file recorded, else the filter's child in qemu's graph."""
    removed = []
    for block in blocks:
        inserted = block.get("inserted") or {}
        root = str(inserted.get("node-name", ""))
        device = block.get("qdev")
        if not (root.startswith(CBW_PREFIX) and device):
            continue
        qom = qom_path(str(device))
        original = state.original(qom) or await filter_child(monitor, root)
        if original is None:
            raise QemuError(
                f"guest device {device} still writes through backupd's filter {root} and "
                "its disk node is unknown; put it back with qom-set by hand"
            )
        await redirect(monitor, qom, original)
        removed.append(f"filter {root} in front of {original}")
    return removed


async def remove_stray_bitmaps(
    monitor: QemuMonitor,
    is_leftover: Callable[[str], bool],
    nodes: list[dict[str, Any]] | None = None,
) -> list[str]:
    """The bitmaps for which ``is_leftover`` says so, on every node (never the export
    bitmap); ``nodes``: qemu's named nodes as just asked."""
    removed = []
    for node in nodes if nodes is not None else await named_nodes(monitor):
        for bitmap in node.get("dirty-bitmaps", []) or []:
            name = bitmap.get("name")
            if name and name != EXPORT_BITMAP and is_leftover(str(name)):
                await remove_bitmap(monitor, node["node-name"], name)
                removed.append(f"bitmap {name} on {node['node-name']}")
    return removed
