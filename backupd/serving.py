"""A served backup image: any point of a chain, read-only over NBD.

One ``qemu-storage-daemon`` serves every disk of a backup, one export per disk named
after it.  The backing chain is given to qemu explicitly, node by node, from the
manifests, and every file passes :func:`backupd.chain.chain_files` (the gate: an image
backupd could have written, at its place in the layout, naming exactly its parent)
before qemu is started: the names written in the files are checked, never followed.
Every option reaches qemu as JSON, never spliced into its comma-separated syntax.

An encrypted VM's files are opened with its key: a ``secret`` object reading the key
file through backupd's checked descriptor (:mod:`backupd.keys`), named by every node's
``encrypt.key-secret``.

Over TCP qemu does the TLS: X.509 (``tls-creds-x509`` on the given folder) or a
pre-shared key (``tls-creds-psk``, which reads ``keys.psk`` in a folder: backupd
copies the user's key file into a private folder of its own for it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from backupd.chain import CheckedFile, checked_chain
from backupd.errors import BackupdError, EncryptionKeyError, NotFoundError, UsageError
from backupd.keys import SECRET_ID, Key
from backupd.manifest import Manifest
from backupd.shield import run_to_completion
from backupd.storage.vmrepo import VMRepo

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


def blockdev_for(files: list[CheckedFile], index: int) -> list[dict[str, object]]:
    """The chain of one disk as qemu nodes, the full first, each backed by the node
    before it (by node name: qemu then never works out a backing file's name, which an
    NBD file node cannot give), each file given as what the gate checked
    (``/dev/fd/N``: a file swapped in the repository after the check is not what qemu
    opens; an object pinned to the checked version, its checked metadata kept),
    encrypted ones with the key's secret.  Node names are short (``d<index>-<depth>``):
    qemu allows 31 characters, disk names may be longer."""
    nodes: list[dict[str, object]] = []
    for depth, checked in enumerate(files):
        node: dict[str, object] = {
            "driver": "qcow2",
            "node-name": f"d{index}-{depth}",
            "read-only": True,
            "file": checked.image.qemu_file(),
            "backing": nodes[-1]["node-name"] if nodes else None,
        }
        if checked.facts.encrypted:
            node["encrypt"] = {"format": "luks", "key-secret": SECRET_ID}
        nodes.append(node)
    return nodes


class ServedImage:
    """``async with ServedImage(repo, manifest, disks, socket=...) as disks:``

    qemu-storage-daemon reports itself ready by writing its pid file, after every node,
    the NBD server and every export exist; its stderr is drained all along (a flood of
    failed TLS handshakes must not fill a pipe and stall it), and :meth:`wait` returns
    when it exits, for a caller that must notice a daemon that died."""

    def __init__(
        self,
        repo: VMRepo,
        manifest: Manifest,
        disks: list[str] | None = None,
        *,
        socket: Path | None = None,
        listen: tuple[str, int] | None = None,
        tls_dir: Path | None = None,
        psk_keys: bytes | None = None,
        key: Key | None = None,
        chains: dict[str, list[CheckedFile]] | None = None,
    ) -> None:
        """``key``: the VM's encryption key (its files are encrypted), open until the
        image is stopped; ``chains``: files of each disk the caller has checked itself
        (and closes), instead of every file of the manifest's chain (a merge serving a
        point while its files change)."""
        self.repo = repo
        self.key = key
        self.chains = chains
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
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._drain: asyncio.Task[None] | None = None

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
        try:
            tls = self._tls_object()
        except OSError as exc:
            raise BackupdError(f"cannot prepare the TLS key for qemu: {exc}") from exc
        if tls is None:
            return ["--nbd-server", json.dumps(server)]
        server["tls-creds"] = tls["id"]
        return ["--object", json.dumps(tls), "--nbd-server", json.dumps(server)]

    async def __aenter__(self) -> list[ServedDisk]:
        try:
            with contextlib.ExitStack() as held:
                args = ["qemu-storage-daemon", "--pidfile", str(self._private_dir() / "qsd.pid")]
                if self.listen is None and self.socket is None:
                    self.socket = self._private_dir() / "nbd.sock"
                fds: list[int] = []
                if self.key is not None:
                    args += ["--object", json.dumps(self.key.qemu_object(SECRET_ID))]
                    fds.append(self.key.fd)
                tops: list[str] = []
                for index, disk in enumerate(self.disks):
                    if self.chains is not None:
                        files = self.chains[disk]
                    else:
                        files = held.enter_context(
                            checked_chain(self.repo, self.manifest, disk, encrypted=bool(self.key))
                        )
                    fds += [fd for checked in files for fd in checked.image.pass_fds]
                    nodes = blockdev_for(files, index)
                    for node in nodes:
                        args += ["--blockdev", json.dumps(node)]
                    tops.append(str(nodes[-1]["node-name"]))
                args += self._server_args()
                for index, (disk, top) in enumerate(zip(self.disks, tops, strict=True)):
                    export = {"type": "nbd", "id": f"e{index}", "node-name": top, "name": disk}
                    args += ["--export", json.dumps({**export, "writable": False})]
                self.proc = await asyncio.create_subprocess_exec(
                    *args,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    pass_fds=fds,
                )
                self._drain = asyncio.create_task(self._drain_stderr())
                await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        return [
            ServedDisk(disk, self.manifest.disks[disk].virtual_size, self._uri(disk))
            for disk in self.disks
        ]

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._stderr.append(line)
                log.debug("qemu-storage-daemon: %s", line)

    def _last_words(self) -> str:
        return self._stderr[-1] if self._stderr else "qemu-storage-daemon exited"

    async def _wait_ready(self) -> None:
        """Until the pid file is there (ready) or the daemon has exited (failed)."""
        assert self.proc is not None
        pidfile = self._private_dir() / "qsd.pid"
        for _ in range(600):
            if self.proc.returncode is not None:
                break
            if pidfile.exists():
                return
            await asyncio.sleep(0.02)
        else:
            raise BackupdError(f"cannot serve backup {self.manifest.id}: qemu did not start")
        if self._drain is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drain), 2)
        words = self._last_words()
        if self.key is not None and "Invalid password" in words:
            raise EncryptionKeyError(
                f"the key in {self.key.settings.key_file} does not open backup "
                f"{self.manifest.id} of vm {self.repo.vm} (qemu: {words})"
            )
        raise BackupdError(f"cannot serve backup {self.manifest.id}: {words}")

    async def wait(self) -> str:
        """Return when qemu-storage-daemon has exited, with what it said last."""
        assert self.proc is not None
        await self.proc.wait()
        if self._drain is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drain), 2)
        return self._last_words()

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
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
        if self.socket is not None and self.listen is None:
            with contextlib.suppress(OSError):
                self.socket.unlink()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def __aexit__(self, *exc: object) -> None:
        await run_to_completion(self.stop())
