"""Running the ``backupd`` CLI in tests, and checking what a run left behind: the
argv, runs in the background (optionally with a fault point), leftovers in qemu and in
the repository, and changes lost (a committed point that differs from the disk)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from integration.harness.chain import (
    backups,
    checkpoint_bitmap,
    first_difference,
    qemu_img_check,
    read_image,
)
from integration.harness.vm import QemuVM


def argv(config: Path, *args: str) -> list[str]:
    """The command line of ``backupd -c CONFIG ARGS...`` with this interpreter."""
    return [sys.executable, "-m", "backupd", "-c", str(config), *args]


def run_env(config: Path, fault: str | None, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ}
    if fault:
        env["BACKUPD_FAULT"] = fault
    return subprocess.Popen(
        argv(config, "run", "--vm", "guest1", *args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def leftovers(vm: QemuVM, repo: Path, scratch: Path) -> list[str]:
    found = []
    state = await vm.state()
    if state["exports"] or state["jobs"] or state["nodes"] != ["drive-vda"]:
        found.append(f"qemu: {state}")
    names = [b["name"] for b in await vm.bitmaps("vda")]
    committed = backups(repo)
    if names != ([checkpoint_bitmap(committed[-1])] if committed else []):
        found.append(f"bitmaps {names}")
    if any(p.name.startswith(".tmp-") for p in (repo / "guest1").iterdir()):
        found.append("staging folder")
    files = [p.name for p in scratch.rglob("*") if p.is_file()]
    if files:
        found.append(f"scratch files {files}")
    return found


def lost_changes(
    points: dict[str, bytes], repo: Path, tmp: Path, *, latest_only: bool = False
) -> int:
    """Committed points whose restore differs from the model (each counts once)."""
    lost = 0
    for folder in backups(repo)[-1:] if latest_only else backups(repo):
        expected = points.get(folder.name)
        if expected is None:
            lost += 1
            continue
        qemu_img_check(folder / "vda.qcow2")
        diff = first_difference(read_image(folder / "vda.qcow2", tmp), expected)
        if diff is not None:
            print(f"{folder.name}: differs from the model at {diff}")
            lost += 1
    return lost


def lost_after(result: subprocess.CompletedProcess[str], repo: Path, tmp: Path, vm: QemuVM) -> int:
    """1 when the run after a fault failed or its backup differs from the disk, else 0."""
    if result.returncode != 0:
        return 1
    latest = read_image(backups(repo)[-1] / "vda.qcow2", tmp)
    return 0 if first_difference(latest, vm.snapshot()["vda"]) is None else 1


async def wait_for_staging(repo: Path, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folder = repo / "guest1"
        if folder.is_dir() and any(
            p.name.startswith(".tmp-") and any(p.iterdir()) for p in folder.iterdir()
        ):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        await asyncio.sleep(0.05)
    raise AssertionError("the run never started copying")


async def backupd_async(
    config: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``backupd -c CONFIG ARGS...`` without blocking the event loop (for tests whose
    own peers, like a stand-in guest agent, run in this loop)."""
    proc = await asyncio.create_subprocess_exec(
        *argv(config, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return subprocess.CompletedProcess(
        list(args), proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )


async def until_backupd_runs(pid: int, timeout: float = 10) -> None:
    """Wait until process ``pid`` handles SIGTERM itself: backupd's own code runs (before
    that, only the Python interpreter is starting, which nothing can make quiet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return  # already gone
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & (1 << (15 - 1)):
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"process {pid} did not start within {timeout} s")
