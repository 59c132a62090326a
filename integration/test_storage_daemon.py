"""backupd's qemu-storage-daemon on its own (real qemu-storage-daemon): started and
stopped, dying with the process that started it, and a leftover found by its pid file."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from backupd.private import private_dir
from backupd.qemu.storage_daemon import (
    PID_FILE,
    QMP_SOCKET,
    StorageDaemon,
    daemon_argv,
    live_daemon,
    stop_leftover,
)


async def test_start_and_stop_in_a_folder_with_a_comma(sockdir: Path) -> None:
    folder = private_dir(sockdir / "a,b", "test")
    daemon = StorageDaemon(folder, timeout=10)
    monitor = await daemon.start()
    try:
        assert monitor.version >= (5, 2, 0)
        pid = live_daemon(folder)
        assert daemon.process is not None and pid == daemon.process.pid
        assert await monitor.execute("query-block-exports") == []
    finally:
        await daemon.stop()
    assert daemon.process.returncode == 0
    assert live_daemon(folder) is None
    assert not (folder / QMP_SOCKET).exists() and not (folder / PID_FILE).exists()


async def test_the_daemon_dies_with_the_process_that_started_it(sockdir: Path) -> None:
    """A process that starts a daemon and is then SIGKILLed: the daemon gets SIGTERM
    from the kernel and goes (its pid file lock is released)."""
    folder = private_dir(sockdir / "d", "test")
    starter = f"""
import asyncio, os, signal, sys
from pathlib import Path
from backupd.qemu.storage_daemon import StorageDaemon
async def main():
    await StorageDaemon(Path({str(folder)!r})).start()
    print("started", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(main())
"""
    proc = subprocess.run(
        [sys.executable, "-c", starter], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == -signal.SIGKILL and "started" in proc.stdout, proc.stderr
    deadline = time.monotonic() + 10
    while live_daemon(folder) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert live_daemon(folder) is None


async def test_stop_leftover(sockdir: Path) -> None:
    folder = private_dir(sockdir / "l", "test")
    assert await stop_leftover(folder, 5) is None
    (folder / PID_FILE).write_text("1\n")  # a daemon that was killed: nothing holds the lock
    assert await stop_leftover(folder, 5) is None
    assert not (folder / PID_FILE).exists()
    leftover = subprocess.Popen(daemon_argv(folder), start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while live_daemon(folder) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        os.kill(leftover.pid, signal.SIGSTOP)  # SIGTERM alone would wait for a SIGCONT
        assert await stop_leftover(folder, 10) == leftover.pid
        assert leftover.wait(10) == 0
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
