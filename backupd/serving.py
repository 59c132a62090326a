"""A served backup image: any point of a chain, read-only over NBD.

One ``qemu-storage-daemon`` serves every disk of a backup, one export per disk named
after it.  The backing chain is given to qemu explicitly, node by node, from the
manifests, and every file passes :func:`backupd.chain.chain_files` (the gate: an image
backupd could have written, at its place in the layout, naming exactly its parent)
before qemu is started: the names written in the files are checked, never followed.
Every option reaches qemu as JSON, never spliced into its comma-separated syntax.

Over TCP qemu does the TLS: X.509 (``tls-creds-x509`` on the given folder) or a
pre-shared key (``tls-creds-psk``, which reads ``keys.psk`` in a folder: backupd
copies the user's key file into a private folder of its own for it).
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
from backupd.errors import BackupdError, NotFoundError, UsageError
from backupd.manifest import Manifest
from backupd.repository import VMRepository

log = logging.getLogger("backupd.serve")


@dataclass(frozen=True, slots=True)
class ServedDisk:
    name: str
    size: int
    uri: str


def load_psk_file(path: Path) -> bytes:
    """A PSK file for qemu's ``tls-creds-psk`` (``username:hexkey`` lines, as GnuTLS's
    psktool writes them), checked line by line; returned with plain LF line ends."""
    try:
        with open(path, "rb") as file:
            data = file.read(1 << 20)
    except OSError as exc:
        raise UsageError(f"cannot read --tls-psk-file {path}: {exc.strerror or exc}") from None
    lines = []
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        name, colon, key = line.partition(b":")
        try:
            valid = bool(name) and bool(colon) and len(bytes.fromhex(key.decode("ascii"))) > 0
        except (UnicodeDecodeError, ValueError):
            valid = False
        if not valid:
            raise UsageError(f"--tls-psk-file {path}, line {number}: not USERNAME:HEXKEY")
        lines.append(line + b"\n")
    if not lines:
        raise UsageError(f"--tls-psk-file {path} holds no USERNAME:HEXKEY line")
    return b"".join(lines)


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
        psk_keys: bytes | None = None,
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
        self.psk_keys = psk_keys
        self.proc: asyncio.subprocess.Process | None = None

    def _uri(self, disk: str) -> str:
        if self.listen is not None:
            host, port = self.listen
            scheme = "nbds" if self.tls_dir or self.psk_keys else "nbd"
            where = f"[{host}]" if ":" in host else host
            return f"{scheme}://{where}:{port}/{disk}"
        assert self.socket is not None
        return f"nbd+unix:///{disk}?socket={self.socket}"

    def _private_dir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="backupd-serve-", dir="/tmp"))
        return self._tmp

    def _tls_object(self) -> dict[str, object] | None:
        """qemu's TLS credentials object for the TCP listener, if any; for PSK it
        first writes the keys into the private folder that object names."""
        if self.tls_dir is not None:
            directory, kind = self.tls_dir, "tls-creds-x509"
        elif self.psk_keys is not None:
            directory, kind = self._private_dir(), "tls-creds-psk"
            fd = os.open(
                directory / "keys.psk", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
            )
            with open(fd, "wb") as file:
                file.write(self.psk_keys)
        else:
            return None
        return {"qom-type": kind, "id": "tls0", "endpoint": "server", "dir": str(directory)}

    def _server_args(self) -> list[str]:
        """``--object`` (TLS) and ``--nbd-server``, as JSON."""
        if self.listen is None:
            assert self.socket is not None
            server: dict[str, object] = {"addr": {"type": "unix", "path": str(self.socket)}}
            return ["--nbd-server", json.dumps(server)]
        host, port = self.listen
        server = {"addr": {"type": "inet", "host": host, "port": str(port)}}
        tls = self._tls_object()
        if tls is None:
            return ["--nbd-server", json.dumps(server)]
        server["tls-creds"] = tls["id"]
        return ["--object", json.dumps(tls), "--nbd-server", json.dumps(server)]

    async def __aenter__(self) -> list[ServedDisk]:
        args = ["qemu-storage-daemon"]
        if self.listen is None and self.socket is None:
            self.socket = self._private_dir() / "nbd.sock"
        served = []
        tops = {}
        for disk in self.disks:
            files = chain_files(self.repo, self.manifest, disk)
            args += ["--blockdev", json.dumps(blockdev_for(files, disk))]
            tops[disk] = f"{disk}-{len(files) - 1}"
            served.append(ServedDisk(disk, self.manifest.disks[disk].virtual_size, self._uri(disk)))
        try:
            args += self._server_args()
        except OSError as exc:
            await self.stop()
            raise BackupdError(f"cannot prepare the TLS key for qemu: {exc}") from exc
        for disk in self.disks:
            export = {"type": "nbd", "id": disk, "node-name": tops[disk], "name": disk}
            args += ["--export", json.dumps({**export, "writable": False})]
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
