"""Fixtures for tests against the fake QMP monitor (fakeqmp.py): a VM with two disks
on guest devices, the monitor serving it, and backupd's QMP client connected to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backupd.qemu.qmp import QemuMonitor
from tests.backupd.fakeqemu import FakeQemu
from tests.backupd.fakeqmp import FakeQmp
from tests.backupd.fleecing import Folders, served, two_disk_vm


@pytest.fixture
def qemu() -> FakeQemu:
    return two_disk_vm()


@pytest.fixture
async def qmp(qemu: FakeQemu, sockdir: Path) -> AsyncIterator[tuple[FakeQmp, QemuMonitor]]:
    async with served(qemu, sockdir) as pair:
        yield pair


@pytest.fixture
def fake(qmp: tuple[FakeQmp, QemuMonitor]) -> FakeQmp:
    return qmp[0]


@pytest.fixture
def monitor(qmp: tuple[FakeQmp, QemuMonitor]) -> QemuMonitor:
    return qmp[1]


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    return Folders.under(tmp_path)
