"""A real Linux guest for tests: Debian's cloud kernel and an initrd with busybox and
qemu-ga (built by scripts/build-guest.sh), booted under TCG from an ext4 disk ``vda``
on which a workload appends numbered, fsync'd records (see harness/ext4.py).

Shaped like QemuVM (``qmp_path`` for backupd, a second QMP monitor for the harness,
``agent_path``, ``images``), so backupd configurations are written the same way.  The
serial console goes to ``console.log`` in the guest's folder; the guest's init prints
what it reached there, and ``wait_ready`` reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

from integration.harness import qga
from integration.harness.ext4 import make_ext4
from integration.harness.qga import AgentError

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
AGENT_PORT = "org.qemu.guest_agent.0"


class GuestError(RuntimeError):
    """The guest did not boot, answer or stop as expected (with its console's tail)."""


@dataclass(frozen=True)
class GuestBuild:
    kernel: Path
    initrd: Path
    packages: str


def build_guest(outdir: Path) -> GuestBuild:
    """scripts/build-guest.sh OUTDIR (which does nothing when OUTDIR is up to date)."""
    result = subprocess.run(
        [str(REPO / "scripts" / "build-guest.sh"), str(outdir)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise GuestError(f"building the guest failed:\n{result.stdout}{result.stderr}")
    return GuestBuild(
        outdir / "vmlinuz", outdir / "initrd.cpio.gz", (outdir / "packages.txt").read_text()
    )


def make_disk(image: Path, size: int) -> None:
    """A qcow2 of SIZE bytes holding an empty ext4 made by the host's mke2fs."""
    raw = image.with_suffix(".raw")
    make_ext4(raw, size)
    try:
        subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
            check=True,
        )
    finally:
        raw.unlink()


class LinuxGuest:
    def __init__(
        self,
        workdir: Path,
        build: GuestBuild,
        *,
        sockdir: Path,
        image: Path | None = None,
        size: int = 64 * MiB,
        workload: bool = True,
    ) -> None:
        self.workdir = workdir
        self.build = build
        self.qmp_path = sockdir / "qmp.sock"  # for backupd
        self.harness_qmp = sockdir / "harness.sock"  # qemu serves one client per monitor
        self.agent_path = sockdir / "qga.sock"  # qemu-ga's virtio port (one client at a time)
        self.images = {"vda": image or workdir / "vda.qcow2"}
        self.size = size
        self.workload = workload
        self.console_path = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient | None = None

    def _args(self) -> list[str]:
        append = "console=ttyS0 panic=-1" + ("" if self.workload else " backupd.workload=0")
        return [
            "qemu-system-x86_64",
            *("-machine", "pc", "-accel", "tcg", "-m", "512", "-nodefaults", "-no-user-config"),
            *("-display", "none", "-no-reboot"),
            *("-kernel", str(self.build.kernel), "-initrd", str(self.build.initrd)),
            *("-append", append, "-serial", f"file:{self.console_path}"),
            *("-qmp", f"unix:{self.qmp_path},server=on,wait=off"),
            *("-qmp", f"unix:{self.harness_qmp},server=on,wait=off"),
            "-blockdev",
            "driver=qcow2,node-name=drive-vda,discard=unmap,"
            f"file.driver=file,file.filename={self.images['vda']}",
            *("-device", "virtio-blk-pci,drive=drive-vda,id=vda"),
            *("-chardev", f"socket,id=qga0,path={self.agent_path},server=on,wait=off"),
            *("-device", "virtio-serial-pci", "-device"),
            f"virtserialport,chardev=qga0,name={AGENT_PORT}",
        ]

    async def start(self) -> LinuxGuest:
        """Start qemu (the guest boots at once); ``wait_ready`` waits for the guest."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.images["vda"].exists():
            make_disk(self.images["vda"], self.size)
        log = open(self.workdir / "qemu.out", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.qmp = await self._connect_qmp()
        return self

    async def _connect_qmp(self) -> QMPClient:
        """The harness's QMP session, once qemu listens (the socket file appears at
        bind(), a moment before listen(): a refused connection is retried)."""
        assert self.proc is not None
        for _ in range(200):
            if self.proc.poll() is not None:
                raise GuestError(f"qemu exited: {(self.workdir / 'qemu.out').read_text()}")
            if not self.harness_qmp.exists():
                await asyncio.sleep(0.05)
                continue
            client = QMPClient("harness")
            try:
                await client.connect(str(self.harness_qmp))
                return client
            except ConnectError:
                await asyncio.sleep(0.05)
        raise GuestError("qemu did not accept QMP connections in 10 s")

    def console(self) -> str:
        try:
            return self.console_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _failure(self, what: str) -> GuestError:
        return GuestError(f"{what}; console:\n{self.console()[-3000:]}")

    async def wait_console(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first match of PATTERN on the console, waiting up to TIMEOUT s for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            text = self.console()
            found = re.search(pattern, text, re.MULTILINE)
            if found:
                return found
            if "guest: FAILED" in text or "Kernel panic" in text:
                raise self._failure(f"the guest failed while waiting for {pattern!r}")
            if self.proc is None or self.proc.poll() is not None:
                raise self._failure(f"qemu exited while waiting for {pattern!r}")
            if loop.time() > deadline:
                raise self._failure(f"no {pattern!r} on the console in {timeout:g} s")
            await asyncio.sleep(0.05)

    async def wait_ready(self, timeout: float = 60) -> int | None:
        """Wait until qemu-ga answers and the workload runs; returns the record number
        the workload started at (None when booted without a workload)."""
        await self.wait_console(r"^guest: ready", timeout)
        await self.agent("guest-ping")
        if not self.workload:
            return None
        found = await self.wait_console(r"^workload: started at (\d+)", timeout)
        return int(found.group(1))

    def records_marked(self) -> int:
        """The record count of the workload's latest progress line on the console."""
        counts = re.findall(r"^workload: (\d+) records", self.console(), re.MULTILINE)
        return int(counts[-1]) if counts else 0

    async def wait_records(self, count: int, timeout: float = 60) -> None:
        """Wait until the workload reports at least COUNT records written."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.records_marked() < count:
            if loop.time() > deadline:
                raise self._failure(f"the workload did not reach {count} records")
            await asyncio.sleep(0.1)

    async def agent(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One qemu-ga command (harness/qga.py); AgentError when qemu-ga refuses it."""
        return await qga.execute(self.agent_path, command, arguments)

    async def run(self, argv: list[str], timeout: float = 30) -> int:
        """Run ARGV in the guest (qemu-ga guest-exec); returns its exit code."""
        started = await self.agent("guest-exec", {"path": argv[0], "arg": argv[1:]})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            status = await self.agent("guest-exec-status", {"pid": started["pid"]})
            if status["exited"]:
                return int(status.get("exitcode", -1))
            await asyncio.sleep(0.1)
        raise self._failure(f"{argv} did not finish in the guest in {timeout:g} s")

    async def stop(self, timeout: float = 60) -> bool:
        """Graceful stop: qemu-ga ``guest-shutdown`` (the guest stops its workload,
        unmounts /data and powers off; qemu stores its persistent bitmaps and exits).
        If the agent refuses (e.g. the guest is frozen) or the guest does not power off
        in TIMEOUT s: QMP ``quit``.  Returns whether the guest shut itself down."""
        if self.proc is None:
            return False
        try:
            await self.agent("guest-shutdown")
            refused = False
        except AgentError:
            refused = True
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            refused = False  # the connection ended: the guest may be powering off
        clean = not refused and await self._exited(timeout)
        if not clean and self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 10)
            await self._exited(20)
        await self.kill()
        return clean

    async def _exited(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc is not None and self.proc.poll() is None:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def kill(self) -> None:
        """SIGKILL qemu if it still runs (a crash of the whole VM); remove the sockets."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        for path in (self.qmp_path, self.harness_qmp, self.agent_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
