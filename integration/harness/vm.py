"""A real qemu with no guest OS, for tests: disks on virtio-blk devices, guest writes
through HMP ``qemu-io`` on the device (so copy-before-write sees them, like real guest
writes), and a byte model of every disk to compare backups and restores against.

qemu-io prints to qemu's stdout and its QMP reply is empty even when a write fails, so
every write is checked against that output before the model is updated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

from qemu.qmp import ConnectError, QMPClient

MiB = 1 << 20


class QemuVM:
    def __init__(
        self,
        workdir: Path,
        disks: dict[str, int],
        *,
        sockdir: Path,
        agent: bool = False,
        file_options: dict[str, str] | None = None,
        formats: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.disks = dict(disks)
        self.qmp_path = sockdir / "qmp.sock"  # for backupd
        self.harness_qmp = sockdir / "harness.sock"  # qemu serves one client per monitor
        self.agent_path = sockdir / "qga.sock" if agent else None
        #: per disk: qcow2 (the default) or raw
        self.formats = {name: (formats or {}).get(name, "qcow2") for name in disks}
        self.images = {
            name: workdir / f"{name}.{'img' if self.formats[name] == 'raw' else 'qcow2'}"
            for name in disks
        }
        # qemu's node names have at most 31 characters; device ids may be longer
        self.nodes = {
            name: f"drive-{name}" if len(name) <= 25 else f"drive-{i}"
            for i, name in enumerate(disks)
        }
        self.model = {name: bytearray(size) for name, size in disks.items()}
        # per disk: the protocol layer under qcow2, e.g. a blkdebug node injecting errors
        self.file_options = file_options or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient | None = None
        self._log = workdir / "qemu.out"
        self._log_pos = 0

    async def start(self) -> QemuVM:
        args = [
            "qemu-system-x86_64",
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp",
            f"unix:{self.harness_qmp},server=on,wait=off",
        ]
        for name, size in self.disks.items():
            image = self.images[name]
            if not image.exists():
                fmt = self.formats[name]
                subprocess.run(
                    ["qemu-img", "create", "-q", "-f", fmt, str(image), str(size)], check=True
                )
            args += [
                "-blockdev",
                f"driver={self.formats[name]},node-name={self.nodes[name]},discard=unmap,"
                + self.file_options.get(name, f"file.driver=file,file.filename={image}"),
                "-device",
                f"virtio-blk-pci,drive={self.nodes[name]},id={name}",
            ]
        out = open(self._log, "ab")  # noqa: SIM115 - handed to the child
        self._log_pos = self._log.stat().st_size
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        for _ in range(200):
            if self.harness_qmp.exists():
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited: {self._log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("qemu did not create its QMP socket in 10 s")
        # qemu creates the socket file a moment before it listens on it
        for attempt in range(100):
            self.qmp = QMPClient("harness")
            try:
                await self.qmp.connect(str(self.harness_qmp))
                break
            except ConnectError:
                if attempt == 99 or self.proc.poll() is not None:
                    raise
                await asyncio.sleep(0.05)
        return self

    async def hmp(self, command: str) -> str:
        assert self.qmp is not None
        result = await asyncio.wait_for(
            self.qmp.execute("human-monitor-command", {"command-line": command}), 30
        )
        return str(result)

    def _new_output(self) -> str:
        data = self._log.read_bytes()[self._log_pos :]
        self._log_pos += len(data)
        return data.decode(errors="replace")

    async def qemu_io(self, disk: str, command: str) -> None:
        reply = await self.hmp(f'qemu-io -d {disk}/virtio-backend "{command}"')
        await asyncio.sleep(0)
        output = ""
        for _ in range(100):
            output += self._new_output()
            if output.strip():
                break
            await asyncio.sleep(0.02)
        if reply.strip() or "failed" in output or "error" in output.lower():
            raise RuntimeError(f"qemu-io {command!r} on {disk} failed: {reply} {output}")

    async def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        await self.qemu_io(disk, f"write -P {pattern:#x} {offset} {length}")
        self.model[disk][offset : offset + length] = bytes([pattern]) * length

    async def write_zeroes(self, disk: str, offset: int, length: int) -> None:
        await self.qemu_io(disk, f"write -z {offset} {length}")
        self.model[disk][offset : offset + length] = bytes(length)

    async def discard(self, disk: str, offset: int, length: int) -> None:
        """Discard whole clusters (they then read as zeros: the images have no backing)."""
        await self.qemu_io(disk, f"discard {offset} {length}")
        self.model[disk][offset : offset + length] = bytes(length)

    async def flush(self, disk: str) -> None:
        """What a guest does before it relies on its writes surviving a crash."""
        await self.hmp(f'qemu-io -d {disk}/virtio-backend "flush"')

    def snapshot(self) -> dict[str, bytes]:
        return {name: bytes(data) for name, data in self.model.items()}

    async def quit(self) -> None:
        """Graceful shutdown: persistent bitmaps are stored."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 10)
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        for path in (self.qmp_path, self.harness_qmp):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def kill(self) -> None:
        """SIGKILL: a crash (runtime bitmaps are lost, loaded ones become inconsistent)."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        for path in (self.qmp_path, self.harness_qmp):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def bitmaps(self, disk: str) -> list[dict[str, object]]:
        assert self.qmp is not None
        nodes = await self.qmp.execute("query-named-block-nodes", {"flat": True})
        for node in nodes:  # type: ignore[attr-defined]
            if node["node-name"] == self.nodes[disk]:
                return [b for b in node.get("dirty-bitmaps", []) if "name" in b]
        return []

    async def state(self) -> dict[str, object]:
        """What qemu holds that a backup could leave behind."""
        assert self.qmp is not None
        return {
            "exports": await self.qmp.execute("query-block-exports"),
            "jobs": await self.qmp.execute("query-block-jobs"),
            "nodes": sorted(
                n["node-name"]  # type: ignore[index]
                for n in await self.qmp.execute("query-named-block-nodes", {"flat": True})  # type: ignore[attr-defined]
                if not str(n["node-name"]).startswith("#")  # type: ignore[index]
            ),
        }
