"""A session cancelled at every await point of its setup, and while it tears down.

The fake monitor holds the k-th command of the setup; the test cancels the run there.
Either qemu still carries the held command out (it was sent: the answer comes after the
cancel) or never does (it was never sent).  Either way everything the session added is
removed again, the guest runs, qemu did not abort, and the scratch folder is empty; the
new checkpoint bitmap stays only where the session says it may be (the run removes it).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from backupd.qemu.fleece import FleeceSession
from backupd.qemu.qmp import QemuMonitor
from tests.backupd.fakeqemu import FakeQemu
from tests.backupd.fakeqmp import FakeQmp
from tests.backupd.fleecing import (
    NEW,
    PARENT,
    Folders,
    forget_new_bitmap,
    new_session,
    served,
    two_disk_vm,
    without,
)


async def setup_commands(tmp_path: Path, sockdir: Path, method: str, parent: bool) -> int:
    """How many QMP commands the setup sends when nothing goes wrong."""
    async with served(two_disk_vm(), sockdir) as (fake, monitor):
        session = await _session(monitor, Folders.under(tmp_path / "dry"), method, parent)
        start = len(fake.commands)
        async with session:
            count = len(fake.commands) - start
    shutil.rmtree(tmp_path / "dry")
    return count


async def _session(
    monitor: QemuMonitor, folders: Folders, method: str, parent: bool
) -> FleeceSession:
    return await new_session(monitor, folders, method=method, parent=PARENT if parent else None)


async def cancel_at(
    k: int, apply: bool, tmp_path: Path, sockdir: Path, method: str, parent: bool
) -> None:
    qemu = two_disk_vm()
    folders = Folders.under(tmp_path / f"run-{k}-{apply}")
    async with served(qemu, sockdir, timeout=0.5) as (fake, monitor):
        before = qemu.snapshot()
        session = await _session(monitor, folders, method, parent)
        hang = fake.hang(nth=k, apply=apply)
        task = asyncio.create_task(session.__aenter__())
        await asyncio.wait_for(hang.reached.wait(), 5)
        what = f"cancelled at command {k} ({hang.command}, {'carried out' if apply else 'dropped'})"
        task.cancel()
        await asyncio.sleep(0.01)
        hang.release()
        with pytest.raises(asyncio.CancelledError):
            await task
        if apply:
            await asyncio.wait_for(hang.answered.wait(), 5)
        after = qemu.snapshot()
        assert qemu.crashed is None, what
        assert after["status"] == "running", what
        if not session.new_bitmap_sent:
            assert after == before, what
        await forget_new_bitmap(monitor, session)
        assert qemu.snapshot() == before, what
        assert list(folders.scratch.iterdir()) == [], what


@pytest.mark.parametrize("parent", [True, False], ids=["incremental", "full"])
async def test_snapshot_access_cancelled_at_every_command(
    tmp_path: Path, sockdir: Path, parent: bool
) -> None:
    count = await setup_commands(tmp_path, sockdir, "snapshot-access", parent)
    # 2 scratch nodes, the bitmaps' transaction, query-status, stop, 2 x (filter, qom-set),
    # cont, 2 views, the frozen parent bitmaps' transaction (incremental only), the NBD
    # server, 2 exports
    assert count == (16 if parent else 15)
    for k in range(1, count + 1):
        for apply in (True, False):
            await cancel_at(k, apply, tmp_path, sockdir, "snapshot-access", parent)


@pytest.mark.qemu
async def test_blockdev_backup_cancelled_at_every_command(tmp_path: Path, sockdir: Path) -> None:
    """(qemu-img makes the scratch images)"""
    count = await setup_commands(tmp_path, sockdir, "blockdev-backup", True)
    assert count == 6  # 2 scratch nodes, the transaction, the NBD server, 2 exports
    for k in range(1, count + 1):
        for apply in (True, False):
            await cancel_at(k, apply, tmp_path, sockdir, "blockdev-backup", True)


async def test_teardown_runs_to_its_end_under_cancellation(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    """Cancelled (twice) while removing the first export: the teardown goes on."""
    before = qemu.snapshot()
    session = await new_session(monitor, folders)
    hang = fake.hang("block-export-del")

    async def run() -> None:
        async with session:
            pass

    task = asyncio.create_task(run())
    await asyncio.wait_for(hang.reached.wait(), 5)
    for _ in range(2):
        task.cancel()
        await asyncio.sleep(0.01)
    assert not task.done()
    hang.release()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert without(qemu.snapshot(), NEW) == before
    assert qemu.crashed is None and list(folders.scratch.iterdir()) == []


async def test_cancelled_inside_the_quiesce_window(
    qemu: FakeQemu, fake: FakeQmp, monitor: QemuMonitor, folders: Folders
) -> None:
    """Cancelled while the file systems are frozen: they are thawed, the session undone."""
    before = qemu.snapshot()
    events: list[str] = []

    class Freeze:
        async def __aenter__(self) -> None:
            events.append("freeze")

        async def __aexit__(self, *exc: object) -> None:
            events.append("thaw")

    hang = fake.hang("blockdev-add", where=lambda args: args["driver"] == "copy-before-write")
    session = await new_session(monitor, folders, quiesce=Freeze)
    task = asyncio.create_task(session.__aenter__())
    await asyncio.wait_for(hang.reached.wait(), 5)
    assert events == ["freeze"]
    task.cancel()
    await asyncio.sleep(0.01)
    hang.release()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == ["freeze", "thaw"]
    await forget_new_bitmap(monitor, session)
    assert qemu.snapshot() == before and qemu.crashed is None
