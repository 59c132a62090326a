"""A served backup image: any point of a chain, read-only over NBD.

One ``qemu-storage-daemon`` serves every disk of a backup, one export per disk named
after it.  The backing chain is given to qemu explicitly, node by node, from the
manifests, and every file passes :func:`backupd.chain.chain_files` (the gate: an image
backupd could have written, at its place in the layout, naming exactly its parent)
before qemu is started: the names written in the files are checked, never followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from backupd.chain import chain_files
from backupd.errors import BackupdError, NotFoundError
from backupd.manifest import Manifest
from backupd.repository import VMRepository

log = logging.getLogger("backupd.serve")


@dataclass(frozen=True, slots=True)
class ServedDisk:
    name: str
    size: int
    uri: str


def blockdev_for(files: list[Path], disk: str) -> dict[str, object]:
    node: dict[str, object] | None = None
    for depth, path in enumerate(files):
        node = {
            "driver": "qcow2",
            "node-name": f"{disk}-{depth}",
            "read-only": True,
            "file": {"driver": "file", "filename": str(path), "read-only": True},
            "backing": node if node is not None else None,
        }
    assert node is not None
    return node


class ServedImage:
    """``async with ServedImage(repo, manifest, disks, socket=...) as disks:``"""

    def __init__(
        self,
        repo: VMRepository,
        manifest: Manifest,
        disks: list[str] | None = None,
        *,
        socket: Path | None = None,
        listen: tuple[str, int] | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        self.repo = repo
        self.manifest = manifest
        self.disks = disks or sorted(manifest.disks)
        for disk in self.disks:
            if disk not in manifest.disks:
                known = ", ".join(sorted(manifest.disks))
                raise NotFoundError(
                    f"backup {manifest.id} of vm {repo.vm} has no disk {disk!r} (disks: {known})"
                )
        self._tmp: Path | None = None
        self.socket = socket
        self.listen = listen
        self.tls_dir = tls_dir
        self.proc: asyncio.subprocess.Process | None = None

    def _uri(self, disk: str) -> str:
        if self.listen is not None:
            host, port = self.listen
            scheme = "nbds" if self.tls_dir else "nbd"
            return f"{scheme}://{host}:{port}/{disk}"
        assert self.socket is not None
        return f"nbd+unix:///{disk}?socket={self.socket}"

    async def __aenter__(self) -> list[ServedDisk]:
        args = ["qemu-storage-daemon"]
        if self.listen is None and self.socket is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="backupd-serve-", dir="/tmp"))
            self.socket = self._tmp / "nbd.sock"
        served = []
        for disk in self.disks:
            files = chain_files(self.repo, self.manifest, disk)
            args += ["--blockdev", json.dumps(blockdev_for(files, disk))]
            served.append(ServedDisk(disk, self.manifest.disks[disk].virtual_size, self._uri(disk)))
        server = "--nbd-server"
        if self.listen is not None:
            host, port = self.listen
            spec = f"addr.type=inet,addr.host={host},addr.port={port}"
            if self.tls_dir is not None:
                args += ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={self.tls_dir}"]
                spec += ",tls-creds=tls0"
        else:
            spec = f"addr.type=unix,addr.path={self.socket}"
        args += [server, spec]
        for disk in self.disks:
            args += [
                "--export",
                f"type=nbd,id={disk},node-name={disk}-"
                f"{len(chain_files(self.repo, self.manifest, disk)) - 1},name={disk},"
                "writable=off",
            ]
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        return served

    async def _wait_ready(self) -> None:
        assert self.proc is not None
        for _ in range(200):
            if self.proc.returncode is not None:
                break
            if self.socket is not None and self.socket.exists():
                return
            if self.listen is not None and await self._port_open():
                return
            await asyncio.sleep(0.05)
        err = b""
        if self.proc.stderr is not None:
            with contextlib.suppress(Exception):
                err = await asyncio.wait_for(self.proc.stderr.read(4096), 1)
        text = err.decode(errors="replace").strip().splitlines()
        raise BackupdError(
            f"cannot serve backup {self.manifest.id}: "
            f"{text[-1] if text else 'qemu-storage-daemon did not start'}"
        )

    async def _port_open(self) -> bool:
        assert self.listen is not None
        try:
            _, writer = await asyncio.open_connection(*self.listen)
        except OSError:
            return False
        writer.close()
        return True

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self.socket is not None and self.listen is None:
            with contextlib.suppress(OSError):
                self.socket.unlink()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                for entry in self._tmp.iterdir():
                    entry.unlink()
                os.rmdir(self._tmp)
            self._tmp = None

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
