"""Restore: read a served backup image with nbdclient and write a raw file (sparse), a
qcow2 file (our writer), or into an NBD target (zeros as WRITE_ZEROES).

A file is written under a temporary name and renamed only when complete and synced, so
nothing half-written is ever left looking like a restored disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nbdclient
from backupd.errors import BackupdError, UsageError
from backupd.fileio import DataFile, pwrite_all
from backupd.qcow2 import Qcow2Writer
from nbdclient.copy import DEFAULT_REQUEST_SIZE, copy_extents, map_source, zero_extents
from nbdclient.extents import MappedExtent

CLUSTER = 65536


@dataclass(frozen=True, slots=True)
class RestoreStats:
    size: int
    data: int
    zero: int


async def _connect_all(uri: str, connections: int) -> list[nbdclient.Client]:
    first = await nbdclient.connect(uri, meta_contexts=["base:allocation"])
    clients = [first]
    if connections > 1 and first.can_multi_conn():
        clients += await asyncio.gather(*(nbdclient.connect(uri) for _ in range(connections - 1)))
    return clients


def _partial_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.part-{os.getpid()}")


def check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise UsageError(f"{output} exists; use --force to overwrite it")
    if not output.parent.is_dir():
        raise UsageError(f"folder {output.parent} does not exist")


async def restore_to_file(
    uri: str,
    output: Path,
    *,
    fmt: str = "raw",
    requests: int = 16,
    connections: int = 4,
    request_size: int = DEFAULT_REQUEST_SIZE,
    progress: Callable[[int], None] | None = None,
) -> RestoreStats:
    clients = await _connect_all(uri, connections)
    partial = _partial_path(output)
    try:
        size = clients[0].size
        extents = await map_source(clients[0])
        data = sum(e.length for e in extents if not e.zero)
        if fmt == "raw":
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            out: DataFile | None = None
            try:
                os.ftruncate(fd, size)
                out = raw = DataFile(fd, partial)

                async def write_raw(view: memoryview, offset: int) -> None:
                    # in a thread: the event loop keeps receiving meanwhile
                    await asyncio.to_thread(raw.write, view, offset)

                await copy_extents(
                    clients,
                    extents,
                    write_raw,
                    requests=requests,
                    request_size=request_size,
                    progress=progress,
                )
                await asyncio.to_thread(os.fsync, fd)
            finally:
                if out is not None:
                    out.close()
                os.close(fd)
        elif fmt == "qcow2":
            # read whole clusters so every stored cluster is complete
            runs: list[tuple[int, int]] = []
            for e in extents:
                if e.zero:
                    continue
                start = e.offset // CLUSTER * CLUSTER
                end = min(size, -(-e.end // CLUSTER) * CLUSTER)
                if runs and start <= runs[-1][1]:
                    runs[-1] = (runs[-1][0], max(runs[-1][1], end))
                else:
                    runs.append((start, end))
            widened = [MappedExtent(s, e - s, False, False, True) for s, e in runs]
            writer = Qcow2Writer(partial, size, cluster_size=CLUSTER).open()
            try:

                def write_qcow2(view: memoryview, offset: int) -> None:
                    host = writer.allocate(offset, len(view))
                    pwrite_all(writer.fd, view, host)

                await copy_extents(
                    clients,
                    widened,
                    write_qcow2,
                    requests=requests,
                    request_size=request_size // CLUSTER * CLUSTER,
                    progress=progress,
                )
                await asyncio.to_thread(writer.finish)
            except BaseException:
                writer.abort()
                raise
        else:
            raise UsageError(f"unknown output format {fmt!r} (raw or qcow2)")
        os.replace(partial, output)
        return RestoreStats(size, data, size - data)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    finally:
        await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)


async def restore_to_nbd(
    uri: str,
    target: str,
    *,
    requests: int = 16,
    progress: Callable[[int], None] | None = None,
) -> RestoreStats:
    clients = await _connect_all(uri, 1)
    try:
        dst = await nbdclient.connect(target)
    except BaseException as exc:
        await clients[0].disconnect()
        if isinstance(exc, nbdclient.NBDError):  # refused, TLS failed, unreachable
            raise BackupdError(f"cannot open the NBD target: {exc}") from exc
        raise
    try:
        size = clients[0].size
        if dst.size < size:
            raise BackupdError(f"NBD target is smaller than the disk ({dst.size} < {size} bytes)")
        if dst.is_read_only():
            raise BackupdError("NBD target is read-only")
        extents = await map_source(clients[0])

        async def write(view: memoryview, offset: int) -> None:
            await dst.pwrite(view, offset)

        await copy_extents(clients, extents, write, requests=requests, progress=progress)
        zero = await zero_extents(dst, extents)
        if dst.can_flush():
            await dst.flush()
        return RestoreStats(size, size - zero, zero)
    finally:
        await asyncio.gather(dst.disconnect(), clients[0].disconnect(), return_exceptions=True)
