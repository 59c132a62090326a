"""The scratch folder of a VM: the files copy-before-write fills, and the session state.

The folder is private (see :mod:`backupd.private`): only backupd writes in it, so what
is found there after a killed run can be trusted and removed.  The state file records
what qemu cannot tell the next run: that the VM was paused, and which guest devices were
pointed at a filter, and at which node they were before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from backupd.errors import QemuError
from backupd.private import create_exclusive, read_private, write_private
from backupd.qemu.fleece.names import SCRATCH_SUFFIXES, STATE_FILE

#: below this much free space the scratch area is called full in error messages
SCRATCH_LOW = 4 << 20


async def create_qcow2(path: Path, size: int) -> None:
    """An empty qcow2 scratch image (blockdev-backup's target; its backing is set by
    the node that opens it)."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        str(path),
        str(size),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise QemuError(f"cannot create scratch image {path}: {err.decode().strip()}")
    path.chmod(0o600)


def create_sparse(path: Path, size: int) -> None:
    """A new sparse raw file of ``size`` bytes (snapshot-access's scratch target)."""
    try:
        fd = create_exclusive(path)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except OSError as exc:
        raise QemuError(f"cannot create scratch file {path}: {exc.strerror}") from None


def remove_files(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def leftover_files(folder: Path) -> list[Path]:
    """The scratch files in ``folder`` (a killed run's, at the start of a run)."""
    if not folder.is_dir():
        return []
    return [path for suffix in SCRATCH_SUFFIXES for path in folder.glob(f"*{suffix}")]


def scratch_full(folder: Path) -> str | None:
    """Why the view may have broken, if the scratch area is (nearly) full."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= SCRATCH_LOW:
        return None
    return (
        f"the scratch area {folder} is full ({free} bytes free): the guest's "
        "writes went on and the point-in-time view broke; give the scratch area room "
        "for what the guest writes during a backup"
    )


@dataclass(frozen=True)
class SessionState:
    """What a run must undo that qemu cannot tell: ``paused`` (the run stopped the VM's
    vCPUs) and ``redirects`` (guest device QOM path, the node it had before)."""

    paused: bool = False
    redirects: tuple[tuple[str, str], ...] = ()

    def original(self, device: str) -> str | None:
        """The node ``device`` had before a filter was put in front of it."""
        return next((node for dev, node in self.redirects if dev == device), None)


def write_state(folder: Path, state: SessionState) -> None:
    text = json.dumps({"paused": state.paused, "redirects": [list(r) for r in state.redirects]})
    write_private(folder / STATE_FILE, text)


def read_state(folder: Path) -> SessionState:
    """The state a killed run left; empty when there is none or it is unreadable."""
    text = read_private(folder / STATE_FILE)
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return SessionState()
    if not isinstance(data, dict):
        return SessionState()
    redirects = tuple(
        (str(entry[0]), str(entry[1]))
        for entry in data.get("redirects") or []
        if isinstance(entry, list) and len(entry) == 2
    )
    return SessionState(paused=bool(data.get("paused")), redirects=redirects)


def remove_state(folder: Path) -> None:
    with contextlib.suppress(OSError):
        (folder / STATE_FILE).unlink()
