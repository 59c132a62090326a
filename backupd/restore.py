"""Restore: read a served backup image with nbdclient's copy engine and write a raw file
(sparse), a qcow2 file (our writer), or into an NBD target (zeros as WRITE_ZEROES).

A file is written under a temporary name in its folder and takes its name only when
complete and synced (:class:`~nbdclient.copy.outfile.OutputFile`), so nothing
half-written is ever left looking like a restored disk; an existing file is replaced
only with ``force``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backupd.config import ImageFormat
from backupd.errors import BackupdError, UsageError
from backupd.qcow2.layout import CLUSTER_SIZE
from backupd.qcow2.sink import Qcow2Sink
from backupd.transfer import plan_clusters
from nbdclient import NBDError
from nbdclient.copy import (
    DEFAULT_REQUEST_SIZE,
    CopyOptions,
    OutputFile,
    Plan,
    RawFileSink,
    Sink,
    Source,
    check_destination,
    copy,
    copy_to_nbd,
)


@dataclass(frozen=True, slots=True)
class RestoreStats:
    size: int
    data: int
    zero: int


def check_output(output: Path, force: bool) -> None:
    if not output.parent.is_dir():
        raise UsageError(f"folder {output.parent} does not exist")
    try:
        check_destination(output, overwrite=force)
    except FileExistsError:
        raise UsageError(f"{output} exists; use --force to overwrite it") from None
    except OSError as exc:
        raise UsageError(f"{output} {exc.strerror}") from None


async def restore_to_file(
    uri: str,
    output: Path,
    *,
    fmt: ImageFormat = ImageFormat.RAW,
    force: bool = False,
    requests: int = 16,
    connections: int = 4,
    request_size: int = DEFAULT_REQUEST_SIZE,
    progress: Callable[[int], None] | None = None,
) -> RestoreStats:
    try:
        async with await Source.open(uri) as source:
            size = source.size
            extents = await source.map()
            data = Plan.from_extents(extents).read_bytes
            out = OutputFile(output, overwrite=force)
            sink: Sink
            if fmt is ImageFormat.RAW:
                plan = Plan.from_extents(extents)
                sink = RawFileSink(out, size)
            else:  # whole clusters, so every stored cluster is complete
                clusters = plan_clusters(extents, incremental=False)
                plan = Plan.from_blocks(clusters.data, [], CLUSTER_SIZE, size)
                sink = Qcow2Sink.into(out, size)
            await copy(
                source,
                plan,
                sink,
                requests=requests,
                request_size=request_size,
                connections=connections,
                progress=progress,
            )
    except NBDError as exc:
        raise BackupdError(f"restore into {output}: {exc}") from exc
    return RestoreStats(size, data, size - data)


async def restore_to_nbd(
    uri: str,
    target: str,
    *,
    requests: int = 16,
    connections: int = 4,
    progress: Callable[[int], None] | None = None,
) -> RestoreStats:
    options = CopyOptions(requests=requests, connections=connections)
    try:
        stats = await copy_to_nbd(uri, target, options, progress=progress)
    except NBDError as exc:
        raise BackupdError(f"restoring into the NBD target failed: {exc}") from exc
    return RestoreStats(stats.size, stats.bytes_read, stats.bytes_zero)
